"""The search stage's run(cfg) on tiny random Llamas: plans, meta, MLflow logging, proxies, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

from kvshare import search
from kvshare.checkpoint import save_model
from kvshare.errors import KVShareError
from kvshare.plan import Plan
from tests.builders import make_cfg, tiny_llama

FAST = ["search.nsga.generations=8", "search.nsga.pop_size=24", "search.workers=1", "search.progress=false"]


def _tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """An 8-head MHA model, a GQA model, and a token folder (random tokens; the split files are what matters)."""
    root = tmp_path_factory.mktemp("search")
    save_model(tiny_llama(heads=8, kv_heads=8, layers=3), _tokenizer(), root / "mha")
    save_model(tiny_llama(heads=8, kv_heads=4, layers=2), _tokenizer(), root / "gqa")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, 97, 4096).astype(np.uint32).tofile(data / f"{split}.bin")
    return root


def run(root, tmp_path, method, budget, *extra, model="mha"):
    out = tmp_path / f"{method}.json"
    cfg = make_cfg(
        root,  # one MLflow store for the module: creating its tables costs seconds
        "search",
        f"search.model_dir={root / model}",
        f"search.method={method}",
        f"search.budget={budget}",
        f"search.out={out}",
        *FAST,
        *extra,
    )
    search.run(cfg)
    return Plan.load(out), root / "mlflow.db"


@pytest.mark.parametrize("method", ["qcqa-ac", "qcqa-ec", "gqa", "mqa", "random", "random-s3", "qcqa-ac+cla2"])
def test_methods_meet_the_budget(root, tmp_path, method):
    plan, _ = run(root, tmp_path, method, 0.5)
    assert plan.kv_fraction <= 0.5
    assert plan.meta["wse_total"] >= 0 and plan.meta["evaluations"] >= 1
    if method == "qcqa-ec":
        for groups in plan.groups:
            assert len(set(np.bincount(groups))) == 1


def test_baselines_between_two_counts(root, tmp_path):
    # 3 layers x 8 heads at budget 0.55 = 13 KV heads: 4/5/4 for GQA (the extra head mid-depth);
    # random seeds put it in random layers, with random partitions.
    gqa, _ = run(root, tmp_path, "gqa", 0.55)
    assert [len(set(g)) for g in gqa.groups] == [4, 5, 4]
    assert all(list(g) == sorted(g) for g in gqa.groups)  # contiguous
    seeds = [run(root, tmp_path, f"random-s{k}", 0.55)[0] for k in (0, 1, 0)]
    assert all(sum(len(set(g)) for g in p.groups) == 13 for p in seeds)
    assert seeds[0].groups == seeds[2].groups != seeds[1].groups


def test_the_stage_imports_no_heavy_library():
    """Starting a search job stays fast: pymoo, scipy, matplotlib, torch load only where a run needs them."""
    import kvshare

    heavy = ("pymoo", "scipy", "matplotlib", "torch", "transformers", "mlflow")
    code = f"import sys, kvshare.search; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    src = str(Path(kvshare.__file__).resolve().parents[1])
    env = os.environ | {"PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"


def test_random_baseline_plans_stay_the_same(root, tmp_path):
    """The random baseline's groupings for a seed are published results: they must not change."""
    plan, _ = run(root, tmp_path, "random-s5", 0.55)
    assert plan.groups == ((0, 0, 1, 2, 3, 2, 2, 1), (0, 1, 2, 3, 1, 2, 1, 1), (0, 1, 2, 0, 0, 3, 4, 3))


def test_layer_counts():
    assert search.layer_counts(30, 3, 72) == [3 if i % 5 in (1, 3) else 2 for i in range(30)]
    assert search.layer_counts(4, 8, 32) == [8] * 4 and search.layer_counts(4, 8, 1000) == [8] * 4
    assert search.layer_counts(4, 8, 4) == [1] * 4


def test_qcqa_beats_gqa_and_logs_to_mlflow(root, tmp_path):
    qcqa, db = run(root, tmp_path, "qcqa-ac", 0.5)
    gqa, _ = run(root, tmp_path, "gqa", 0.5)
    assert qcqa.meta["wse_total"] <= gqa.meta["wse_total"]
    assert qcqa.meta["solver"] == "nsga" and qcqa.meta["stage2"] == "dp"
    assert 0 < qcqa.meta["hypervolume"] <= 1 and qcqa.meta["search_seconds"] > 0
    client = mlflow.tracking.MlflowClient(f"sqlite:///{db}")
    run_id = qcqa.meta["search_run_id"]
    hv = client.get_metric_history(run_id, "hypervolume")
    assert sorted(m.step for m in hv) == list(range(9))  # generation 0 (initial population) .. 8
    assert [m.value for m in sorted(hv, key=lambda m: m.step)] == sorted(m.value for m in hv)  # archive never worsens
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"fronts.json", "fronts.png", "qcqa-ac.json"} <= names
    fronts = json.loads(open(client.download_artifacts(run_id, "fronts.json", str(tmp_path))).read())
    assert len(fronts["layers"]) == 3 and fronts["global_front"]["kv_heads"][-1] == 24


def test_paper_preset_and_same_seed_same_plan(root, tmp_path):
    a, _ = run(root, tmp_path, "qcqa-ac", 0.5, "search=paper")
    b, _ = run(root, tmp_path, "qcqa-ac", 0.5, "search=paper")
    assert a.groups == b.groups and a.meta["wse_total"] == b.meta["wse_total"]
    assert a.meta["stage2"] == "nsga" and a.meta["nsga"]["operators"] == "paper" and a.meta["nsga"]["seed"] == 1234


def test_gqa_source_model(root, tmp_path):
    plan, _ = run(root, tmp_path, "qcqa-ac", 0.5, model="gqa")
    assert plan.shape.num_kv_heads == 4 and plan.kv_fraction <= 0.5


def test_output_proxy_and_rank_check(root, tmp_path):
    plan, db = run(
        root,
        tmp_path,
        "qcqa-ac",
        0.5,
        f"search.calibration.data_dir={root / 'data'}",
        "search.calibration.tokens=256",
        "search.calibration.seq_len=64",
        "search.proxy=output",
        "search.proxy_check.candidates=6",
        "search.proxy_check.tokens=128",
        "search.solver=greedy",
    )
    assert plan.meta["proxy"] == "output" and plan.meta["wse_weight_total"] > 0
    check = plan.meta["proxy_check"]
    assert -1 <= check["rho_weight"] <= 1 and -1 <= check["rho_output"] <= 1
    client = mlflow.tracking.MlflowClient(f"sqlite:///{db}")
    assert "proxy_rho_output" in client.get_run(plan.meta["search_run_id"]).data.metrics


def test_output_proxy_equals_distances_of_outputs(root):
    """WSE on output vectors W R equals the squared error of the merged heads' K/V outputs on the inputs."""
    from kvshare import proxy
    from kvshare.checkpoint import load_model
    from kvshare.wse import wse

    model, _ = load_model(root / "mha")
    windows = torch.randint(0, 97, (2, 16))
    dists = proxy.output_dists(model, windows)
    inputs = []
    attn = model.model.layers[1]
    handle = attn.input_layernorm.register_forward_hook(lambda m, i, o: inputs.append(o.reshape(-1, o.shape[-1])))
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    x = inputs[0].double()
    groups = [0, 0, 1, 1, 1, 2, 3, 3]
    direct = 0.0
    for proj in (attn.self_attn.k_proj, attn.self_attn.v_proj):
        out = (x @ proj.weight.double().T).reshape(len(x), 8, -1)  # (tokens, head, dim)
        for g in set(groups):
            members = out[:, [h for h in range(8) if groups[h] == g]]
            direct += ((members - members.mean(1, keepdim=True)) ** 2).sum().item()
    assert wse(dists[1], groups) == pytest.approx(direct / len(x), rel=1e-6)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["search.groups=9"], "group count 9"),
        (["search.groups=0"], "group count 0"),
        (["search.method=qcqa-ec", "search.groups=3"], "group count 3 does not divide"),
        (["search.budget=0.1"], "raise search.budget"),
        (["search.solver=annealing"], "search.solver='annealing'"),
        (["search.proxy=activation"], "search.proxy='activation'"),
        (["search.proxy=output"], "search.calibration.data_dir"),
        (["search.nsga.operators=sbx"], "search.nsga.operators='sbx'"),
        (["search.stage2_nsga.mutation_prob=2"], "search.stage2_nsga.mutation_prob=2"),
    ],
)
def test_bad_input(root, tmp_path, extra, named):
    with pytest.raises(KVShareError, match=None) as info:
        run(root, tmp_path, "qcqa-ac", 0.5, *extra)
    message = str(info.value)
    assert named in message and "\n" not in message


def test_model_without_separable_kv_heads(root):
    from kvshare.wse import kv_head_vectors

    model = tiny_llama(heads=4, kv_heads=4, layers=1)
    attn = model.model.layers[0].self_attn
    attn.k_proj = torch.nn.Identity()  # e.g. a fused QKV projection: no per-head K rows to group
    with pytest.raises(KVShareError, match="separable K/V heads"):
        kv_head_vectors(model)


def test_servable_limits_qcqa_to_equal_groups_and_refuses_the_rest(root, tmp_path):
    from kvshare.serving import Layout

    plan, _ = run(root, tmp_path, "qcqa-ac", 0.6, "search.servable=true")
    assert Layout.of_plan(plan).form() is not None and plan.meta["servable"] and plan.kv_fraction <= 0.6
    assert all(len(set(Layout.of_plan(plan).sizes(i))) == 1 for i in range(plan.shape.num_layers))
    # GQA at a budget between whole equal groups (8 heads -> 3 per layer) has unequal groups: refused, no plan.
    with pytest.raises(KVShareError, match="unequal groups"):
        run(root, tmp_path, "gqa", 3 / 8, "search.servable=true")
    assert not (tmp_path / "gqa.json").exists()
    with pytest.raises(KVShareError, match="cross-layer"):
        run(root, tmp_path, "gqa+cla2", 0.5, "search.servable=true")
