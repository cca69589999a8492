"""The converted models compute what they should, and their KV cache holds what the plan promises."""

import pytest
import torch
import transformers.integrations.sdpa_attention as sdpa_attention
import transformers.models.llama.modeling_llama as modeling_llama
from transformers import AutoModelForCausalLM

import kvshare.modeling  # noqa: F401  (registers kvshare_llama)
from kvshare.merge import convert_model
from kvshare.modeling import KVShareStaticCache, cache_bytes
from kvshare.plan import ModelShape, Plan, cla_pattern
from tests.builders import tiny_llama


@pytest.fixture(scope="module")
def base():
    return tiny_llama(heads=8, kv_heads=4, layers=4)


@pytest.fixture(scope="module")
def shape(base):
    return ModelShape.of(base.config)


def tokens(seed=1, batch=2, length=12):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def plans(shape):
    """One plan per method family, with unequal groups and differing counts between layers."""
    unequal = ((0, 0, 0, 1), (0, 1, 1, 2), (0, 1, 2, 3), (0, 0, 1, 1))
    return {
        "gqa": Plan(shape, ((0, 0, 1, 1),) * 4, tuple(range(4)), "gqa"),
        "mqa": Plan(shape, ((0, 0, 0, 0),) * 4, tuple(range(4)), "mqa"),
        "qcqa-ac": Plan(shape, ((2, 0, 2, 1),) + unequal[1:], tuple(range(4)), "qcqa-ac"),
        "qcqa-ec": Plan(shape, ((0, 1, 0, 1), (0, 1, 1, 0), (0, 0, 1, 1), (0, 1, 0, 1)), tuple(range(4)), "qcqa-ec"),
        "cla2": Plan.identity(shape).with_cla(cla_pattern(4, 2)),
        "qcqa-ac+cla2": Plan(shape, unequal, tuple(range(4)), "x").with_cla(cla_pattern(4, 2)),
        "cla-explicit": Plan.identity(shape).with_cla([0, 0, 0, 3], "mean"),
    }


@torch.no_grad()
def test_identity_grouping_reproduces_base(base, shape):
    x = tokens()
    for permute in (True, False):
        model = convert_model(base, Plan.identity(shape), permute)
        assert (model(x).logits - base(x).logits).abs().max() <= 1e-5


@torch.no_grad()
def test_identity_cla_pattern_reproduces_base(base, shape):
    model = convert_model(base, Plan.identity(shape).with_cla(list(range(4))))
    assert (model(tokens()).logits - base(tokens()).logits).abs().max() <= 1e-5


def test_gqa_conversion_is_the_mean_pool(base, shape):
    model = convert_model(base, plans(shape)["gqa"])
    for i in range(4):
        for proj in ("k_proj", "v_proj"):
            w = getattr(base.model.layers[i].self_attn, proj).weight.reshape(4, 8, -1)
            expected = torch.cat([(w[0] + w[1]) / 2, (w[2] + w[3]) / 2])
            assert torch.equal(getattr(model.model.layers[i].self_attn, proj).weight, expected)


@torch.no_grad()
def test_permuted_ec_export_equals_unpermuted_model(base, shape):
    plan = Plan(shape, ((0, 1, 0, 1), (1, 0, 0, 1), (0, 0, 1, 1), (0, 1, 1, 0)), tuple(range(4)), "qcqa-ec")
    unpermuted = convert_model(base, plan, permute=False)
    plain = convert_model(base, plan, export=True)
    assert type(plain).__name__ == "LlamaForCausalLM" and plain.config.num_key_value_heads == 2
    x = tokens()
    assert (plain(x).logits - unpermuted(x).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("method", list(plans(ModelShape(4, 8, 4, 8))))
@torch.no_grad()
def test_generation_with_cache_equals_without_and_cache_bytes_match(base, shape, method):
    plan = plans(shape)[method]
    model = convert_model(base, plan)
    x, new = tokens(batch=2, length=7), 6
    out = model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False, return_dict_in_generate=True
    )
    seq = x
    for _ in range(new):
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out.sequences, seq)
    cached_tokens = x.shape[1] + new - 1  # the last generated token is never fed back
    analytic = x.shape[0] * cached_tokens * plan.kv_bytes_per_token(dtype_bytes=4)
    assert cache_bytes(out.past_key_values) == analytic


@pytest.mark.parametrize("method", ["qcqa-ac+cla2", "qcqa-ec"])
@torch.no_grad()
def test_save_load_round_trip_is_exact(base, shape, method, tmp_path):
    model = convert_model(base, plans(shape)[method])
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(model)
    x = tokens()
    assert torch.equal(back(x).logits, model(x).logits)


def test_training_backward_reaches_shared_kv(base, shape):
    model = convert_model(base, plans(shape)["qcqa-ac+cla2"]).train()
    x = tokens()
    model(input_ids=x, labels=x).loss.backward()
    producer = model.model.layers[0].self_attn
    assert producer.k_proj.weight.grad is not None and producer.k_proj.weight.grad.abs().sum() > 0
    assert not hasattr(model.model.layers[1].self_attn, "k_proj")


def static_cases(shape):
    return {"base": Plan.identity(shape)} | {k: plans(shape)[k] for k in ("qcqa-ac", "cla2", "qcqa-ac+cla2")}


def greedy(model, x, new, **kwargs):
    return model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=new,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", list(static_cases(ModelShape(4, 8, 4, 8))))
@torch.no_grad()
def test_static_cache_generation_equals_dynamic_and_uncached(base, shape, method, attn):
    plan = static_cases(shape)[method]
    model = convert_model(base, plan)
    model.config._attn_implementation = attn
    x, new = tokens(batch=2, length=7), 6
    max_len = x.shape[1] + new - 1  # the last generated token is never fed back
    dynamic = greedy(model, x, new)
    static = KVShareStaticCache(model.config, max_cache_len=max_len, batch_size=2, dtype=torch.float32)
    analytic = x.shape[0] * max_len * plan.kv_bytes_per_token(dtype_bytes=4)
    assert cache_bytes(static) == analytic == x.shape[0] * max_len * model.config.cache_bytes_per_token(4)
    out = greedy(model, x, new, past_key_values=static)
    # Chunked prefill into a static cache, then generate() feeds the last prompt token.
    chunked = KVShareStaticCache(model.config, max_cache_len=max_len, batch_size=2, dtype=torch.float32)
    for s in range(0, x.shape[1] - 1, 3):
        model(input_ids=x[:, s : min(s + 3, x.shape[1] - 1)], past_key_values=chunked)
    after_chunks = greedy(model, x, new, past_key_values=chunked)
    seq = x
    for _ in range(new):
        seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    for run in (out, after_chunks):
        assert torch.equal(run.sequences, dynamic.sequences) and torch.equal(run.sequences, seq)
        for a, b in zip(run.logits, dynamic.logits, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)
        assert run.past_key_values is not None and cache_bytes(run.past_key_values) == analytic


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_grouped_attention_never_repeats_kv_per_query_head(base, shape, attn, monkeypatch):
    """Prefill in chunks (masked) and decode into a static cache: K/V reach the backend with their own heads."""
    real = modeling_llama.repeat_kv

    def no_copies(hidden, n_rep):
        assert n_rep == 1, f"K/V repeated {n_rep}x per query head"
        return real(hidden, n_rep)

    monkeypatch.setattr(modeling_llama, "repeat_kv", no_copies)
    monkeypatch.setattr(sdpa_attention, "repeat_kv", no_copies)
    for method in ("base", "qcqa-ac+cla2"):
        model = convert_model(base, static_cases(shape)[method])
        model.config._attn_implementation = attn
        x = tokens(batch=2, length=7)
        cache = KVShareStaticCache(model.config, max_cache_len=10, batch_size=2, dtype=torch.float32)
        model(input_ids=x[:, :3], past_key_values=cache)
        greedy(model, x, 4, past_key_values=cache)


@torch.no_grad()
def test_static_cache_bad_input_names_the_value_and_the_fix(base, shape):
    model = convert_model(base, plans(shape)["qcqa-ac+cla2"])
    x = tokens(batch=2, length=7)
    cache = KVShareStaticCache(model.config, max_cache_len=10, batch_size=2, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"max_cache_len=10 .* needs 11: .*max_cache_len >= prompt \+ new") as err:
        greedy(model, x, 5, past_key_values=cache)
    assert "\n" not in str(err.value)
    cache = KVShareStaticCache(model.config, max_cache_len=10, batch_size=3, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"batch_size=3 but got a batch of 2: .*batch_size=2$"):
        model(input_ids=x, past_key_values=cache)
    with pytest.raises(TypeError, match=r"model_type='llama': .*transformers.StaticCache"):
        KVShareStaticCache(base.config, max_cache_len=10, batch_size=2, dtype=torch.float32)
