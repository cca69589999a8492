"""The convert stage on tiny random models of each family: streamed, dtype-preserving, sharded, exact."""

import copy
import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

import kvshare.modeling  # noqa: F401  (registers kvshare_llama)
from kvshare import convert, search
from kvshare.checkpoint import INDEX, Tensors, read_config
from kvshare.errors import KVShareError
from kvshare.merge import convert_model
from kvshare.plan import ModelShape, Plan, cla_pattern
from tests.builders import make_cfg

SIZE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
            vocab_size=97, max_position_embeddings=256)  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
FAMILIES = {
    "llama": lambda: LlamaConfig(**SIZE, attention_bias=True, rope_parameters=LLAMA3_ROPE),
    "mistral": lambda: MistralConfig(**SIZE, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**SIZE, tie_word_embeddings=False),
}


def tokenizer():
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))


def random_model(family: str, dtype=torch.bfloat16, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]())
    with torch.no_grad():  # biases are zero at init: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model.to(dtype).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def source(request, tmp_path_factory):
    """A bf16 checkpoint of one family in 3 safetensors shards, as save_pretrained writes a large model."""
    folder = tmp_path_factory.mktemp(request.param) / "base"
    model = random_model(request.param)
    model.save_pretrained(folder, max_shard_size="60KB")
    tokenizer().save_pretrained(folder)
    return request.param, folder, model


def shape_of(folder):
    return ModelShape.of(read_config(folder))


def plans(shape):
    unequal = ((0, 0, 0, 1),) * shape.num_layers  # 4 KV heads into groups of 3 and 1
    return {
        "base": Plan.identity(shape),
        "gqa": Plan(shape, ((0, 0, 1, 1),) * shape.num_layers, tuple(range(shape.num_layers)), "gqa"),
        "qcqa-ac": Plan(shape, unequal, tuple(range(shape.num_layers)), "qcqa-ac"),
        "qcqa-ac+cla2": Plan(shape, unequal, tuple(range(shape.num_layers)), "qcqa-ac").with_cla(
            cla_pattern(shape.num_layers, 2)
        ),
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module: each store has a tracking service to start."""
    return tmp_path_factory.mktemp("store")


def run_convert(store, root, folder, plan, out, *extra):
    plan_file = root / f"{plan.method}.json"
    plan.save(plan_file)
    return convert.run(
        make_cfg(store, "convert", f"convert.model_dir={folder}", f"convert.plan={plan_file}", f"convert.out={out}",
                 *extra)
    )  # fmt: skip


@pytest.mark.parametrize("method", ["base", "gqa", "qcqa-ac", "qcqa-ac+cla2"])
def test_streamed_conversion_equals_the_in_memory_reference(source, store, method, tmp_path):
    family, folder, model = source
    plan = plans(shape_of(folder))[method]
    spec = run_convert(store, tmp_path, folder, plan, tmp_path / "out", "convert.max_shard_size=50KB")
    config = read_config(tmp_path / "out")
    plain = method in ("base", "gqa")
    assert config["model_type"] == (family if plain else "kvshare_llama") and spec["export"] == config["model_type"]
    assert config["dtype"] == "bfloat16" and (tmp_path / "out" / INDEX).exists()  # kept the source's dtype; shards
    assert all(info[0] == "BF16" for info in map(Tensors(tmp_path / "out").info, Tensors(tmp_path / "out").names()))
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    base = copy.deepcopy(model).float()
    reference = convert_model(base, plan, export=True)
    assert type(converted) is type(reference)
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        got, want = converted(x).logits, reference(x).logits
        assert (got - want).abs().max() <= 0.05 * want.abs().max()  # bf16 storage of the means: rounding only
        if method == "base":
            assert (got - base(x).logits).abs().max() <= 1e-5  # the identity plan changes nothing


def test_output_is_readable_as_a_folder_written_in_place_and_leaves_snakemakes_marker(source, store, tmp_path):
    """Written atomically (temporary 0700/0600 files), the checkpoint still gets the permissions mkdir and open
    give; the source's `.snakemake_timestamp` (a directory output's marker) is not copied."""
    import os

    family, folder, model = source
    (folder / ".snakemake_timestamp").touch()
    run_convert(store, tmp_path, folder, plans(shape_of(folder))["qcqa-ac"], tmp_path / "out")
    umask = os.umask(0)
    os.umask(umask)
    out = tmp_path / "out"
    assert not (out / ".snakemake_timestamp").exists()
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert all(path.stat().st_mode & 0o777 == 0o666 & ~umask for path in out.iterdir())


def test_float32_output_of_a_bf16_source_and_cache_bytes(source, store, tmp_path):
    family, folder, model = source
    plan = plans(shape_of(folder))["qcqa-ac+cla2"]
    run_convert(store, tmp_path, folder, plan, tmp_path / "out", "convert.dtype=float32")
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert converted.dtype == torch.float32 and converted.config.source_model_type == family
    with torch.no_grad():
        cache = converted(torch.randint(0, 97, (1, 10)), use_cache=True).past_key_values
    assert kvshare.modeling.cache_bytes(cache) == plan.kv_bytes_per_token(4) * 10
    # The same folder loads without kvshare, through its bundled modelling code.
    assert (tmp_path / "out" / "modeling_kvshare.py").exists()
    assert read_config(tmp_path / "out")["auto_map"]["AutoModelForCausalLM"].startswith("modeling_kvshare.")


def test_search_reads_bf16_shards(source, store, tmp_path):
    _, folder, _ = source
    out = tmp_path / "plan.json"
    search.run(
        make_cfg(store, "search", f"search.model_dir={folder}", "search.method=qcqa-ac", "search.budget=0.5",
                 f"search.out={out}", "search.workers=1", "search.progress=false", "search.nsga.generations=4")
    )  # fmt: skip
    plan = Plan.load(out)
    assert plan.kv_fraction <= 0.5 and plan.shape == shape_of(folder)


def test_bad_inputs_end_in_one_line_and_write_nothing(store, tmp_path, monkeypatch):
    folder = tmp_path / "base"
    random_model("llama").save_pretrained(folder, max_shard_size="60KB")
    plan = plans(shape_of(folder))["gqa"]
    out = tmp_path / "out"

    # Too little disk: refused before anything is written.
    monkeypatch.setattr("shutil.disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(KVShareError, match=r"needs .* GB but the disk holding .* has 0.0 GB free"):
        run_convert(store, tmp_path, folder, plan, out)
    monkeypatch.undo()
    assert not out.exists()

    # A shard the index names is missing.
    index = json.loads((folder / INDEX).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (folder / first).rename(tmp_path / "moved")
    with pytest.raises(KVShareError, match=f"names {first}, which is not in"):
        run_convert(store, tmp_path, folder, plan, out)
    (tmp_path / "moved").rename(folder / first)

    # Another architecture, and a sliding window.
    config = json.loads((folder / "config.json").read_text())
    for change, named in (({"model_type": "gpt2"}, "'gpt2' model: kvshare converts llama, mistral, qwen2"),
                          ({"model_type": "mistral", "sliding_window": 64}, "sliding_window=64")):  # fmt: skip
        (folder / "config.json").write_text(json.dumps(config | change))
        with pytest.raises(KVShareError, match=named):
            run_convert(store, tmp_path, folder, plan, out)
    assert not out.exists()
