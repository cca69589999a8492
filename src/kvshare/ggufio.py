"""A kvshare checkpoint as a GGUF file that llama.cpp loads (the ``gguf`` package; numpy, no torch).

Names and layouts follow llama.cpp's own converter (``convert_hf_to_gguf.py``,
``LlamaModel``): ``blk.<i>.attn_q.weight`` and so on, Q and K rows permuted from
Hugging Face's rotate-half order to the interleaved pairs of llama.cpp's normal
RoPE, norms in float32, a tied LM head left out (llama.cpp reuses the
embedding), and the tokenizer's BPE vocabulary, merges and special tokens.

Every layer is written as plain GQA: query heads are reordered so that each KV
group's queries are contiguous, and, where a layer's groups are unequal and
padding was asked for, KV heads are repeated until each serves the same number
of query heads (the model's function is unchanged either way). A layout with the
same KV-head count in every layer is the ``llama`` architecture; differing
counts are ``deci`` (llama.cpp's Llama graph with per-layer ``head_count_kv``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from math import gcd
from pathlib import Path

from kvshare.checkpoint import Tensors
from kvshare.errors import KVShareError
from kvshare.serving import Layout

# export.type -> (GGMLQuantizationType name, LlamaFileType name)
QTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
          "q8_0": ("Q8_0", "MOSTLY_Q8_0")}  # fmt: skip
ARCH = {"llama": "llama", "per-layer": "deci"}
FAMILIES = ("llama", "mistral")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def check_exportable(config: dict, folder: str | Path) -> None:
    """A one-line error for a checkpoint whose family or attention extras the GGUF export does not write."""
    family = config.get("source_model_type") or config.get("model_type")
    if family not in FAMILIES:
        raise KVShareError(
            f"{folder} is a {family} model: the GGUF export writes Llama and Mistral checkpoints (no attention biases)"
        )
    if config.get("attention_bias") or config.get("o_proj_bias"):
        raise KVShareError(f"{folder} has attention biases, which the GGUF export does not write")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "linear"):
        raise KVShareError(f"{folder} uses {rope.get('rope_type')} RoPE scaling, which the GGUF export does not write")


def rope_permute(w, heads: int):
    """Hugging Face's rotate-half rows → llama.cpp's interleaved pairs (``LlamaModel.permute``)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def plain_heads(query_map: tuple[int, ...], pad: bool) -> tuple[list[int], list[int]]:
    """(order of the query heads, the source KV head of each new KV head) that make a layer plain GQA."""
    order = sorted(range(len(query_map)), key=lambda h: (query_map[h], h))
    sorted_map = [query_map[h] for h in order]
    sizes = [sorted_map.count(k) for k in range(max(sorted_map) + 1)]
    size = gcd(*sizes)
    if len(set(sizes)) > 1 and not pad:
        raise KVShareError("a layer has unequal groups: export.pad=true repeats KV heads into equal ones")
    return order, [sorted_map[b * size] for b in range(len(query_map) // size)]


def layer_tensors(t: Tensors, layer: int, query_map, head_dim: int, pad: bool) -> dict:
    """One layer's attention in GGUF names and layout: queries reordered, KV heads picked (repeated), RoPE rows."""
    pre, out = f"model.layers.{layer}.self_attn", f"blk.{layer}"
    order, kv = plain_heads(query_map, pad)
    q = t.float32(f"{pre}.q_proj.weight")
    q = q.reshape(len(order), head_dim, -1)[order].reshape(q.shape)
    o = t.float32(f"{pre}.o_proj.weight")
    o = o.reshape(o.shape[0], len(order), head_dim)[:, order].reshape(o.shape)
    k, v = (t.float32(f"{pre}.{p}_proj.weight") for p in ("k", "v"))
    k, v = (x.reshape(-1, head_dim, x.shape[1])[kv].reshape(len(kv) * head_dim, -1) for x in (k, v))
    return {
        f"{out}.attn_q.weight": rope_permute(q, len(order)),
        f"{out}.attn_k.weight": rope_permute(k, len(kv)),
        f"{out}.attn_v.weight": v,
        f"{out}.attn_output.weight": o,
    }


def gguf_tensors(t: Tensors, layout: Layout, head_dim: int, pad: bool) -> Iterator[tuple[str, object]]:
    """``(GGUF name, float32 array)`` of the whole model, one layer's attention in memory at a time."""
    done: set[int] = set()
    for name in t.names():
        m = _LAYER.match(name)
        if m is None:
            if name not in _NAMES:
                raise KVShareError(f"tensor {name} has no GGUF name: the checkpoint is not a Llama-family model")
            yield _NAMES[name], t.float32(name)
        elif m[2] in _LAYER_NAMES:
            yield f"blk.{m[1]}.{_LAYER_NAMES[m[2]]}", t.float32(name)
        elif m[2].startswith("self_attn.") and int(m[1]) not in done:
            layer = int(m[1])
            done.add(layer)
            yield from layer_tensors(t, layer, layout.maps[layer], head_dim, pad).items()
        elif not m[2].startswith("self_attn."):
            raise KVShareError(f"tensor {name} has no GGUF name: the checkpoint is not a Llama-family model")


def encode(array, qtype: str):
    """A tensor in the file's type: matrices as ``qtype``, vectors (norms) in float32, as llama.cpp's converter."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    if array.ndim < 2 or qtype == "f32":
        return array.astype(np.float32), GGMLQuantizationType.F32
    kind = GGMLQuantizationType[QTYPES[qtype][0]]
    if kind == GGMLQuantizationType.Q8_0 and array.shape[-1] % 32:
        return quants.quantize(array, GGMLQuantizationType.F16), GGMLQuantizationType.F16
    return quants.quantize(array, kind), kind


def add_hparams(w, config: dict, counts: list[int], form: str, qtype: str) -> None:
    """Architecture keys: sizes, per-layer ``head_count_kv`` (deci) or one count (llama), RoPE, norm epsilon."""
    from gguf import LlamaFileType

    heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    per_layer = form == "per-layer"
    w.add_context_length(config.get("max_position_embeddings", 2048))
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(layers)
    w.add_feed_forward_length([config["intermediate_size"]] * layers if per_layer else config["intermediate_size"])
    w.add_head_count([heads] * layers if per_layer else heads)
    w.add_head_count_kv(counts if per_layer else counts[0])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0))
    if rope.get("rope_type", rope.get("type")) == "linear":
        from gguf import RopeScalingType

        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(config["vocab_size"])
    w.add_file_type(LlamaFileType[QTYPES[qtype][1]])


def add_tokenizer(w, folder: Path, config: dict, pre: str) -> None:
    """The checkpoint's byte-level BPE tokenizer (``tokenizer.json``): tokens, types, merges, special ids."""
    from gguf import BpeVocab, SpecialVocab, TokenType

    try:
        vocab = BpeVocab(folder)
    except (FileNotFoundError, ValueError) as e:
        raise KVShareError(f"{folder}'s tokenizer is not a byte-level BPE tokenizer.json ({e}): not exported") from None
    tokens, types = [], []
    for text, _, kind in vocab.all_tokens():
        tokens.append(text)
        types.append(kind)
    for _ in range(config["vocab_size"] - len(tokens)):  # an embedding larger than the vocabulary
        tokens.append(f"[PAD{len(tokens)}]".encode())
        types.append(TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    for key in ("bos", "eos", "pad"):  # the model config's ids win over the tokenizer's guesses
        if isinstance(config.get(f"{key}_token_id"), int):
            special.special_token_ids[key] = config[f"{key}_token_id"]
    special.add_to_gguf(w, quiet=True)


def write_gguf(path: Path, folder: str | Path, config: dict, layout: Layout, qtype: str, pad: bool,
               pre: str, meta: dict[str, str]) -> dict:  # fmt: skip
    """Write the GGUF file at ``path`` (the caller makes it atomic); returns its architecture and KV heads."""
    from gguf import GGUFWriter

    folder = Path(folder)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    counts = [layout.padded_kv_heads(i) if pad else layout.kv_heads(i) for i in range(len(layout.maps))]
    form = "llama" if len(set(counts)) == 1 else "per-layer"
    w = GGUFWriter(str(path), ARCH[form])
    w.add_name(meta.get("name", folder.name))
    for key, value in meta.items():
        if key != "name":
            w.add_string(f"kvshare.{key}", value)
    add_hparams(w, config, counts, form, qtype)
    add_tokenizer(w, folder, config, pre)
    for name, array in gguf_tensors(Tensors(folder), layout, head_dim, pad):
        data, kind = encode(array, qtype)
        w.add_tensor(name, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"arch": ARCH[form], "kv_heads": counts}
