"""The fast decode path (compiled step, static cache, sdpa fast paths) computes what the reference path does."""

import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo

import kvshare.modeling as modeling
from kvshare.decode import (
    GraphDecoder,
    compile_for_decode,
    floor_seconds,
    kv_bytes_per_token,
    kv_read_bytes_per_token,
    static_cache,
)
from kvshare.merge import convert_model
from kvshare.plan import ModelShape
from tests.builders import tiny_llama
from tests.test_modeling import greedy, plans, tokens

METHODS = ["gqa", "qcqa-ac", "qcqa-ec", "cla2", "mqa", "qcqa-ac+cla2"]


@pytest.fixture(scope="module")
def base():
    return tiny_llama(heads=8, kv_heads=4, layers=4)


def reference(base, plan):
    """The converted model on the generic path: eager attention, K/V gathered per query head."""
    model = convert_model(base, plan)
    model.config._attn_implementation = "eager"
    for layer in model.model.layers:
        layer.self_attn.kv_layout = "gather"
    return model


def no_generic_attention(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the generic attention path ran")

    monkeypatch.setattr(modeling.SharedKVAttention, "_attend", fail)


@pytest.mark.parametrize(
    ("method", "attention"), [(m, "sdpa") for m in METHODS] + [("qcqa-ac", "matmul"), ("mqa", "matmul")]
)
@torch.no_grad()
def test_compiled_decode_equals_reference(base, method, attention, monkeypatch):
    plan = plans(ModelShape.of(base.config))[method]
    ref = reference(base, plan)
    x, new = tokens(batch=2, length=7), 6
    expected, expected_full = greedy(ref, x, new), ref(x).logits
    model = compile_for_decode(convert_model(base, plan), "eager", None, all_devices=True, attention=attention)
    no_generic_attention(monkeypatch)  # from here on, only the fast paths may run
    # Prefill without a cache: causal attention, one sdpa per group size.
    assert (model(x).logits - expected_full).abs().max() <= 1e-5
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cache = static_cache(model, batch_size=2, max_cache_len=x.shape[1] + new - 1)
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph for every decode step
        out = greedy(model, x, new, past_key_values=cache)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch.equal(out.sequences, expected.sequences)
    for a, b in zip(out.logits, expected.logits, strict=True):
        assert (a - b).abs().max() <= 1e-5
    cached = x.shape[1] + new - 1
    assert cache.length == cached
    assert modeling.cache_bytes(cache) == 2 * cached * plan.kv_bytes_per_token(dtype_bytes=4)


@torch.no_grad()
def test_compiled_decode_still_names_a_full_cache(base):
    model = compile_for_decode(
        convert_model(base, plans(ModelShape.of(base.config))["qcqa-ac+cla2"]), "eager", None, True
    )
    torch._dynamo.reset()
    x = tokens(batch=2, length=7)
    cache = static_cache(model, batch_size=2, max_cache_len=9)
    with pytest.raises(ValueError, match=r"max_cache_len=9 .* needs 10"):
        greedy(model, x, 4, past_key_values=cache)


@torch.no_grad()
def test_prefill_computes_no_padded_query_head(base, monkeypatch):
    """Unequal groups: one sdpa per distinct group size, on exactly the layer's query heads."""
    plan = plans(ModelShape.of(base.config))["qcqa-ac"]
    model = convert_model(base, plan)
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((q.shape[1], k.shape[1], kwargs.get("enable_gqa", False)))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    no_generic_attention(monkeypatch)
    x = tokens(batch=2, length=7)
    model(x, past_key_values=static_cache(model, batch_size=2, max_cache_len=7))
    for i in range(4):
        maps = model.config.q_to_kv[i]
        sizes = sorted({maps.count(g) for g in range(max(maps) + 1)})
        layer_calls, calls = calls[: len(sizes)], calls[len(sizes) :]
        assert [q // kv for q, kv, _ in layer_calls] == sizes
        assert sum(q for q, _, _ in layer_calls) == 8 and sum(kv for _, kv, _ in layer_calls) == max(maps) + 1
    assert not calls


@torch.no_grad()
def test_plain_export_decodes_compiled_with_transformers_static_cache(base):
    plan = plans(ModelShape.of(base.config))["gqa"]
    plain = convert_model(base, plan, export=True)
    x, new = tokens(batch=2, length=7), 5
    expected = greedy(plain, x, new)
    compile_for_decode(plain, backend="eager", mode=None, all_devices=True)
    torch._dynamo.reset()
    out = greedy(plain, x, new, past_key_values=static_cache(plain, 2, x.shape[1] + new))
    assert torch.equal(out.sequences, expected.sequences)


def test_floor_counts_weights_and_the_cache_they_read(base):
    plan = plans(ModelShape.of(base.config))["qcqa-ac+cla2"]
    model = convert_model(base, plan)
    assert kv_bytes_per_token(model.config, 2) == plan.kv_bytes_per_token(2)
    assert kv_bytes_per_token(base.config, 2) == 2 * 4 * 4 * 8 * 2
    assert kv_read_bytes_per_token(base.config, 2) == kv_bytes_per_token(base.config, 2)
    # cla2: each stored entry is attended to by its layer and the next
    assert kv_read_bytes_per_token(model.config, 2) == 2 * kv_bytes_per_token(model.config, 2)
    assert floor_seconds(100, 10, batch=2, context=5, bandwidth=10.0) == 20.0


def test_bench_variants_of_the_7b_shape_store_matched_kv():
    """decode_floor_bench: gqa, qcqa-ac, qcqa-ec and cla2 keep half the KV heads; qcqa-ac's groups are unequal."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import decode_floor_bench as bench

    shape = ModelShape(32, 32, 32, 128)
    plans = bench.half_kv_plans(shape)
    assert {v: plans[v].stored_kv_heads for v in plans} == {"gqa": 512, "qcqa-ac": 512, "qcqa-ec": 512, "cla2": 512,
                                                            "mqa": 32}  # fmt: skip
    ac = plans["qcqa-ac"]
    assert all(len({ac.groups[i].count(g) for g in range(16)}) > 1 for i in range(32))
    assert len({ac.groups[i] for i in range(32)}) == 32


@torch.no_grad()
def test_compiled_decode_of_left_padded_prompts_equals_reference(base):
    """Padding: the prefill takes the masked path, the compiled steps read the padded mask."""
    plan = plans(ModelShape.of(base.config))["qcqa-ac+cla2"]
    ref = reference(base, plan)
    x = tokens(batch=2, length=7)
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # the first prompt is 4 tokens, left-padded
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    expected = ref.generate(x, output_logits=True, **kwargs)
    model = compile_for_decode(convert_model(base, plan), "eager", None, all_devices=True)
    torch._dynamo.reset()
    out = model.generate(x, past_key_values=static_cache(model, 2, 11), output_logits=True, **kwargs)
    assert torch.equal(out.sequences, expected.sequences)
    for a, b in zip(out.logits, expected.logits, strict=True):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["qcqa-ac+cla2", "mqa"])
@torch.no_grad()
def test_bf16_compiled_decode_is_within_rounding_of_the_reference(base, method):
    """bf16: logits within 1e-2 of the reference path's (their scale here: ~0.5); the greedy tokens equal while
    the reference's top-two margin exceeds that."""
    bf16 = tiny_llama(heads=8, kv_heads=4, layers=4).to(torch.bfloat16)
    plan = plans(ModelShape.of(bf16.config))[method]
    x = tokens(batch=2, length=7)
    expected = greedy(reference(bf16, plan), x, 6)
    model = compile_for_decode(convert_model(bf16, plan), "eager", None, all_devices=True)
    torch._dynamo.reset()
    out = greedy(model, x, 6, past_key_values=static_cache(model, 2, 12))
    for step, (a, b) in enumerate(zip(out.logits, expected.logits, strict=True)):
        assert (a.float() - b.float()).abs().max() <= 1e-2
        top2 = b.float().topk(2).values
        if not torch.equal(out.sequences[:, 7 + step], expected.sequences[:, 7 + step]):
            assert (top2[:, 0] - top2[:, 1]).min() <= 1e-2  # a near-tie, decided by rounding
            break


@pytest.mark.parametrize("attention", ["flex", "sdpa", "matmul"])
@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_graph_decoder_equals_reference(base, method, attention):
    """GraphDecoder (the fused, per-layer-compiled step; no CUDA graph on the CPU) generates the reference path's
    tokens, its step's logits equal the reference's, and its cache holds exactly the plan's K/V bytes."""
    plan = plans(ModelShape.of(base.config))[method]
    ref = reference(base, plan)
    x, new = tokens(batch=2, length=7), 6
    expected = greedy(ref, x, new)
    decoder = GraphDecoder(convert_model(base, plan), 2, x.shape[1] + new - 1, attention=attention, backend="eager")
    assert torch.equal(decoder.generate(x, new), expected.sequences)
    cached = x.shape[1] + new - 1
    assert decoder.cache.length == cached
    assert modeling.cache_bytes(decoder.cache) == 2 * cached * plan.kv_bytes_per_token(dtype_bytes=4)
    # The last step again, from the same cache: its logits against the reference's last ones.
    pos = torch.tensor([cached - 1])
    logits = decoder.step(expected.sequences[:, cached - 1 : cached], pos)
    assert (logits - expected.logits[-1]).abs().max() <= 1e-5


@torch.no_grad()
def test_graph_decoder_cuts_after_eos_as_generate_does(base):
    plan = plans(ModelShape.of(base.config))["qcqa-ac"]
    x, new = tokens(batch=2, length=7), 6
    model = convert_model(base, plan)
    free_run = greedy(model, x, new).sequences
    eos = int(free_run[0, 8])  # the first row's second new token ends it
    expected = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                              eos_token_id=eos, pad_token_id=0)  # fmt: skip
    decoder = GraphDecoder(model, 2, x.shape[1] + new - 1, backend=None)
    assert torch.equal(decoder.generate(x, new, eos_token_id=eos, pad_token_id=0), expected)


@torch.no_grad()
def test_graph_decoder_names_what_does_not_fit(base, monkeypatch):
    model = convert_model(base, plans(ModelShape.of(base.config))["gqa"])
    decoder = GraphDecoder(model, 2, 9, backend=None)
    assert {spec.attention for _, _, spec in decoder.layers} == {"flex"}  # the default off CUDA
    with pytest.raises(ValueError, match=r"max_cache_len=9, .* 7 \+ 4 tokens.* max_cache_len >= 10"):
        decoder.generate(tokens(batch=2, length=7), 4)
    with pytest.raises(ValueError, match=r"batch_size=2 .*batch of 3"):
        decoder.generate(tokens(batch=3, length=7), 2)
    decoder.start(torch.zeros(2, 1, dtype=torch.long), 8)
    with pytest.raises(ValueError, match=r"2 steps from position 8 .* max_cache_len >= 10"):
        decoder.decode(2)
    with pytest.raises(ValueError, match="attention='flash' is not one of"):
        GraphDecoder(model, 2, 9, attention="flash")
    with pytest.raises(ValueError, match=r"^gemv='triton-fused' is not one of cublas, triton$"):
        GraphDecoder(model, 2, 9, gemv="triton-fused")
    with pytest.raises(
        ValueError, match=r"^pdl=True .* capability 9.0 .* attention='triton', gemv='triton' on cpu: pass"
    ):
        GraphDecoder(model, 2, 9, attention="triton", pdl=True)
    monkeypatch.setattr("kvshare.pdl.supported", lambda device: True)
    with pytest.raises(ValueError, match=r"^pdl=True is for batches of up to 16 .* got batch_size=17: pass pdl=False$"):
        GraphDecoder(model, 17, 9, attention="triton", pdl=True)
    monkeypatch.delenv("TRITON_INTERPRET")  # the tests' interpreter off: the kernel needs a GPU
    with pytest.raises(ValueError, match="attention='triton' runs on CUDA .* on cpu"):
        GraphDecoder(model, 2, 9, attention="triton")
    with pytest.raises(TypeError, match="needs a kvshare model, got model_type='llama'"):
        GraphDecoder(base, 2, 9)


@pytest.mark.parametrize("method", ["qcqa-ac", "qcqa-ac+cla2"])
@torch.no_grad()
def test_gathered_prefill_equals_the_bucketed_one(base, method):
    """prefill_attention="gather" (K/V copied per query head, one sdpa) computes what the buckets do."""
    model = convert_model(base, plans(ModelShape.of(base.config))[method])
    x = tokens(batch=2, length=7)
    want = model(x).logits
    for module in model.modules():
        if isinstance(module, modeling.SharedKVAttention):
            module.prefill_attention = "gather"
    assert (model(x).logits - want).abs().max() <= 1e-5


@torch.no_grad()
def test_graph_decoder_compiled_as_one_step_equals_reference(base):
    plan = plans(ModelShape.of(base.config))["qcqa-ac+cla2"]
    x, new = tokens(batch=2, length=7), 5
    expected = greedy(reference(base, plan), x, new).sequences
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    decoder = GraphDecoder(convert_model(base, plan), 2, 11, attention="sdpa", backend="eager", compile_unit="step")
    assert torch.equal(decoder.generate(x, new), expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the whole step, every step


def test_fused_projections_leave_the_model_as_it_was(base, tmp_path):
    """GraphDecoder fuses in place: the model's forward, its parameters, their gradients and what save_pretrained
    writes are as before."""
    model = convert_model(base, plans(ModelShape.of(base.config))["qcqa-ac+cla2"])
    x = tokens(batch=2, length=7)
    names = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = model(x).logits.detach()
    GraphDecoder(model, 2, 12, backend=None)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == dict.fromkeys(names, True)
    assert all(torch.equal(p, names[n]) for n, p in model.named_parameters())
    out = model(x).logits
    assert torch.equal(out, want)
    out.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "q_proj" in n or "gate_proj" in n)
    model.save_pretrained(tmp_path)
    assert torch.equal(type(model).from_pretrained(tmp_path)(x).logits, want)


def test_bench_targets_give_cla_its_floor_counting_reads():
    """decode_floor_bench's targets: a CLA cell's miss of the issue's floor is followed by its floor counting the
    K/V its layers read again; a cell whose reads equal its cache has no such clause."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import decode_floor_bench as bench

    def cell(variant, step, floor, read):
        return dict(shape="s", variant=variant, phase="decode", batch=32, path="graph", step_ms=step, floor_ms=floor,
                    read_floor_ms=read, fraction_of_floor=floor / step, tok_s=32 / step)  # fmt: skip

    gqa, cla = cell("gqa", 10.0, 9.0, 9.0), cell("cla2", 16.0, 9.0, 15.2)
    lines = bench.targets([gqa, cla], {("s", "decode", 32, "graph"): gqa})
    assert "- met: s gqa [graph] B=32 at 0.90 of its floor (target ≥ 0.80)" in lines
    (line,) = [x for x in lines if "cla2" in x]
    assert line.startswith("- MISSED: s cla2 [graph] B=32 at 0.56 of its floor") and line.endswith(
        "floor 15.2 ms and 0.95 of it"
    )
