"""The export stage on tiny random models: the GGUF it writes, read back, computes what kvshare's model does."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import kvshare.modeling  # noqa: F401  (registers kvshare_llama)
from kvshare import convert, export
from kvshare.checkpoint import SPEC, load_model
from kvshare.errors import KVShareError
from kvshare.ggufio import rope_permute
from kvshare.merge import _build, kvshare_config
from kvshare.plan import ModelShape, Plan, cla_pattern
from kvshare.serving import Layout, deployable_kv_bytes_per_token
from kvshare.sources import train_tokenizer
from tests.builders import make_cfg, tiny_llama

LAYERS = 4
PLANS = {  # per layer, the new KV head of each of the 4 source KV heads
    "gqa": [(0, 0, 1, 1)] * LAYERS,
    "per-layer": [(0, 0, 1, 1), (0, 1, 2, 3), (0, 0, 0, 0), (0, 1, 0, 1)],
    "unequal": [(0, 0, 0, 1), (0, 1, 1, 1), (0, 0, 1, 1), (0, 1, 2, 2)],
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama (8 query heads, 4 KV heads) with a byte-level BPE tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("export") / "base"
    model = tiny_llama(heads=8, kv_heads=4, layers=LAYERS, vocab=300)
    model.save_pretrained(folder)
    texts = ["the quick brown fox jumps over the lazy dog", "def f(x): return x + 1"] * 20
    train_tokenizer(texts, 300).save_pretrained(folder)
    return folder


def converted(base, tmp_path, name: str, cla: bool = False):
    shape = ModelShape.of(json.loads((base / "config.json").read_text()))
    plan = Plan(shape, tuple(PLANS[name]), tuple(range(LAYERS)), name)
    if cla:
        plan = plan.with_cla(cla_pattern(LAYERS, 2))
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "converted"
    overrides = [f"convert.model_dir={base}", f"convert.plan={tmp_path / 'plan.json'}", f"convert.out={out}"]
    convert.run(make_cfg(tmp_path, "convert", *overrides, "convert.dtype=float32"))
    return out, plan


def run_export(tmp_path, checkpoint, out, *extra):
    cfg = make_cfg(tmp_path, "export", f"export.checkpoint={checkpoint}", f"export.out={out}", *extra)
    return export.run(cfg)


def from_gguf(path):
    """A kvshare_llama model with the GGUF's weights (RoPE rows back to rotate-half), as llama.cpp would run it."""
    from gguf import GGUFReader, dequantize

    r = GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    counts = r.fields[f"{arch}.attention.head_count_kv"].contents()
    counts = counts if isinstance(counts, list) else [counts] * LAYERS
    heads = np.max(r.fields[f"{arch}.attention.head_count"].contents())
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}  # fmt: skip
    state = {}
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)]).astype(np.float32)
        parts = t.name.split(".")
        if parts[0] == "blk":
            layer, kind = int(parts[1]), parts[2]
            if kind in ("attn_q", "attn_k"):  # the inverse of rope_permute is rope_permute of the swapped axes
                n = heads if kind == "attn_q" else counts[layer]
                w = w.reshape(n, w.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
            state[f"model.layers.{layer}.{names[kind]}.weight"] = torch.from_numpy(w)
        else:
            state[f"{names[parts[0]]}.weight"] = torch.from_numpy(w)
    return arch, counts, state


def gguf_model(path, base):
    arch, counts, state = from_gguf(path)
    source = json.loads((base / "config.json").read_text())
    maps = [[h // (8 // c) for h in range(8)] for c in counts]
    model = _build(kvshare_config(source, maps, list(range(LAYERS))), torch.float32)
    model.load_state_dict(state, strict=False)  # the tied LM head is the embedding
    model.tie_weights()
    return arch, counts, model.eval()


@pytest.mark.parametrize("name,pad", [("gqa", False), ("per-layer", False), ("unequal", True)])
def test_the_gguf_computes_what_the_checkpoint_does(base, tmp_path, name, pad):
    checkpoint, plan = converted(base, tmp_path, name)
    out = tmp_path / "model.gguf"
    result = run_export(tmp_path, checkpoint, out, "export.type=f32", f"export.pad={str(pad).lower()}")
    arch, counts, model = gguf_model(out, base)
    layout = Layout.of_plan(plan)
    assert arch == result["arch"] == ("llama" if len(set(counts)) == 1 else "deci")
    assert counts == [layout.padded_kv_heads(i) for i in range(LAYERS)]
    assert result["served_kv_bytes_per_token"] == deployable_kv_bytes_per_token(plan, 2)
    assert result["kv_bytes_per_token"] == plan.kv_bytes_per_token(2)
    reference, _ = load_model(checkpoint, dtype=torch.float32)
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, reference(x).logits, atol=1e-5)


@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0"])
def test_quantised_types_stay_close(base, tmp_path, qtype):
    checkpoint, _ = converted(base, tmp_path, "per-layer")
    out = tmp_path / f"model.{qtype}.gguf"
    run_export(tmp_path, checkpoint, out, f"export.type={qtype}")
    _, _, model = gguf_model(out, base)
    reference, _ = load_model(checkpoint, dtype=torch.float32)
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        got, want = model(x).logits, reference(x).logits
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


def test_the_tokenizer_is_written(base, tmp_path):
    from gguf import GGUFReader

    checkpoint, _ = converted(base, tmp_path, "gqa")
    run_export(tmp_path, checkpoint, tmp_path / "m.gguf")
    r = GGUFReader(tmp_path / "m.gguf")
    tokens = r.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 300 and r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(r.fields["tokenizer.ggml.merges"].data) > 0


def test_unservable_plans_and_bad_input_end_in_one_line_and_write_nothing(base, tmp_path):
    unequal, _ = converted(base, tmp_path / "u", "unequal")
    cla, _ = converted(base, tmp_path / "c", "gqa", cla=True)
    out = tmp_path / "x.gguf"
    with pytest.raises(KVShareError, match="unequal groups.*export.pad=true"):
        run_export(tmp_path, unequal, out)
    with pytest.raises(KVShareError, match="CLA"):
        run_export(tmp_path, cla, out, "export.pad=true")
    with pytest.raises(KVShareError, match="export.type='q3_k' is not known"):
        run_export(tmp_path, unequal, out, "export.type=q3_k")
    no_spec = tmp_path / "nospec"
    no_spec.mkdir()
    (no_spec / "config.json").write_text((unequal / "config.json").read_text())
    with pytest.raises(KVShareError, match=SPEC):
        run_export(tmp_path, no_spec, out)
    assert not out.exists() and not list(tmp_path.glob(".x*"))
    # From the command line: one line, exit status 2.
    args = [sys.executable, "-m", "kvshare.export", f"export.checkpoint={unequal}", f"export.out={out}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]  # fmt: skip
    p = subprocess.run(args, capture_output=True, text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "unequal groups" in p.stderr
    assert not out.exists()


def test_rope_permute_is_llamacpp_s():
    """llama.cpp's converter: rows of each head go from [x0..x(d/2-1), y0..] to interleaved [x0, y0, x1, y1, ...]."""
    w = np.arange(8, dtype=np.float32)[:, None]  # one head of dimension 8
    assert rope_permute(w, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_deployable_bytes_pad_unequal_groups_and_count_every_layer():
    shape = ModelShape(num_layers=2, num_heads=9, num_kv_heads=3, head_dim=64)  # SmolLM2's attention, 2 layers
    gqa = Plan(shape, ((0, 0, 1),) * 2, (0, 1), "gqa")  # 6 + 3 query heads: padded to 3 KV heads of 3 queries
    assert Layout.of_plan(gqa).form() is None and gqa.kv_bytes_per_token(2) == 2 * 2 * 2 * 64 * 2
    assert deployable_kv_bytes_per_token(gqa, 2) == 2 * 3 * 2 * 64 * 2
    mqa_cla = Plan(shape, ((0, 0, 0),) * 2, (0, 1), "mqa").with_cla([0, 0])  # one layer stores, both cache
    assert mqa_cla.kv_bytes_per_token(2) == 1 * 2 * 64 * 2 and deployable_kv_bytes_per_token(mqa_cla) == 2 * 2 * 64 * 2
    per_layer = Plan(shape, ((0, 1, 2), (0, 0, 0)), (0, 1), "qcqa-ec")
    assert Layout.of_plan(per_layer).form() == "per-layer"
    assert deployable_kv_bytes_per_token(per_layer) == per_layer.kv_bytes_per_token(2)


@pytest.mark.parametrize("name,pad", [("gqa", False), ("per-layer", False), ("unequal", True)])
def test_llamacpp_computes_what_kvshare_does(base, tmp_path, name, pad):
    """Only where llama-cpp-python is installed (benchmarks/llamacpp_check.py says how): the real client."""
    llama_cpp = pytest.importorskip("llama_cpp")
    checkpoint, plan = converted(base, tmp_path, name)
    out = tmp_path / "model.gguf"
    run_export(tmp_path, checkpoint, out, "export.type=f32", f"export.pad={str(pad).lower()}")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    x = torch.randint(3, 300, (24,))
    llm.eval(x.tolist())
    reference, _ = load_model(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        want = torch.log_softmax(reference(x[None]).logits[0].double(), -1)
    got = torch.log_softmax(torch.from_numpy(np.array(llm.scores[:24])).double(), -1)
    assert (got - want).abs().max() < 1e-3
