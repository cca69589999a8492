"""Each stage's run(cfg) on a tiny model built from the real pydoc corpus, in-process."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from kvshare import convert, evaluate, finetune, prepare, search, tokens
from kvshare.checkpoint import load_model
from kvshare.data import load_tokens
from kvshare.fronts import pareto_mask
from kvshare.pareto import plot
from tests.builders import pipeline_cfg


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")

    cfg = pipeline_cfg(root, "model.num_hidden_layers=2")
    prepare.run(cfg("prepare", f"prepare.out={root}/base"))
    tokens.run(cfg("tokenize", f"tokenize.model_dir={root}/base", f"tokenize.out={root}/data"))
    search.run(
        cfg("search", f"search.model_dir={root}/base", "search.method=gqa", "search.budget=0.5",
            f"search.out={root}/p.json")
    )  # fmt: skip
    convert.run(
        cfg("convert", f"convert.model_dir={root}/base", f"convert.plan={root}/p.json", f"convert.out={root}/ck")
    )
    return root, cfg


def test_finetune_lowers_heldout_loss_and_writes_a_checkpoint(pipeline):
    root, cfg = pipeline
    out = finetune.run(
        cfg(
            "finetune",
            f"finetune.checkpoint={root}/ck",
            f"finetune.data_dir={root}/data",
            f"finetune.out={root}/ft",
            "finetune.max_steps=40",
            "finetune.lr=3e-3",
            "finetune.seq_len=64",
        )
    )
    assert out["heldout_loss_after"] < out["heldout_loss_before"] - 0.5
    spec = json.loads((root / "ft" / "kvshare_spec.json").read_text())
    assert set(spec["runs"]) == {"search", "convert", "finetune"}


def test_evaluate_perplexity_equals_direct_computation(pipeline):
    root, cfg = pipeline
    summary = evaluate.run(
        cfg(
            "evaluate",
            f"evaluate.checkpoint={root}/ck",
            f"evaluate.base_dir={root}/base",
            f"evaluate.data_dir={root}/data",
            f"evaluate.out={root}/m.json",
            "evaluate.seq_len=32",
            "evaluate.max_windows=3",
            "evaluate.tasks=[]",
        )
    )
    model, _ = load_model(root / "ck", dtype=torch.float32)
    val = torch.from_numpy(np.asarray(load_tokens(root / "data", "val")[: 3 * 32], dtype=np.int64)).view(3, 32)
    with torch.no_grad():
        logits = model(val).logits[:, :-1]
    direct = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), val[:, 1:].reshape(-1))
    m = summary["metrics"]
    assert m["perplexity"] == pytest.approx(math.exp(direct.item()), rel=1e-5)
    assert m["eval_tokens"] == 3 * 31
    assert m["cache_bytes_per_token_measured"] == m["cache_bytes_per_token_analytic"]
    assert m["kv_fraction"] == 0.5 and 0 < m["top1_agreement"] <= 1 and m["kl_to_base"] > 0


def test_evaluate_kl_with_the_base_logits_taken_first_equals_both_models_resident(pipeline):
    root, cfg = pipeline
    common = (f"evaluate.checkpoint={root}/ck", f"evaluate.base_dir={root}/base", f"evaluate.data_dir={root}/data",
              "evaluate.seq_len=32", "evaluate.max_windows=5", "evaluate.batch_size=2", "evaluate.tasks=[]")  # fmt: skip
    runs = {
        kl: evaluate.run(cfg("evaluate", *common, f"evaluate.kl={kl}", f"evaluate.out={root}/{kl}.json"))["metrics"]
        for kl in ("resident", "sequential")
    }
    for key in ("perplexity", "kl_to_base", "top1_agreement", "eval_tokens"):
        assert runs["sequential"][key] == pytest.approx(runs["resident"][key], rel=1e-6), key
    assert runs["resident"]["kl_to_base"] > 0


def test_evaluate_out_of_memory_names_the_settings_to_lower(pipeline, monkeypatch):
    root, cfg = pipeline

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr("kvshare.metrics.perplexity_and_agreement", oom)
    with pytest.raises(evaluate.KVShareError, match=r"evaluate.batch_size=3, seq_len=32, zeroshot_batch_size=5: lower"):
        evaluate.run(
            cfg("evaluate", f"evaluate.checkpoint={root}/ck", f"evaluate.base_dir={root}/base", f"evaluate.data_dir={root}/data",
                f"evaluate.out={root}/oom.json", "evaluate.seq_len=32", "evaluate.tasks=[]", "evaluate.batch_size=3",
                "evaluate.zeroshot_batch_size=5")
        )  # fmt: skip
    assert not (root / "oom.json").exists()


def test_pareto_front_on_hand_made_points():
    cost = np.array([1.0, 2.0, 2.0, 3.0, 4.0, 4.0])
    ppl = np.array([50.0, 30.0, 40.0, 30.0, 10.0, 10.0])
    assert pareto_mask(cost, ppl, higher_is_better=False).tolist() == [True, True, False, False, True, True]
    acc = np.array([0.3, 0.5, 0.5, 0.4, np.nan, 0.6])
    assert pareto_mask(cost, acc, higher_is_better=True).tolist() == [True, True, True, False, False, True]


def test_plot_is_written(tmp_path):
    df = pd.DataFrame(
        {
            "variant": ["converted"] * 3,
            "method": ["gqa", "qcqa-ac", "base"],
            "kv_bytes_per_token": [10, 10, 20],
            "perplexity": [30.0, 20.0, 10.0],
            "front_perplexity": [False, True, True],
        }
    )
    plot(df, "perplexity", tmp_path / "p.png", log_y=True)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    # A study without zero-shot tasks still gets its accuracy plot, saying so.
    plot(df.assign(zeroshot_avg=np.nan), "zeroshot_avg", tmp_path / "a.png", log_y=False)
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_papers_comparisons_on_hand_made_points():
    from kvshare.comparisons import kv_saving_at_quality, matched, wse_rank_correlation

    df = pd.DataFrame(
        {
            "model": ["m"] * 6,
            "variant": ["converted"] * 6,
            "method": ["gqa", "qcqa-ac", "qcqa-ac", "mqa", "cla2", "random"],
            "kv_bytes_per_token": [200, 200, 100, 100, 100, 200],
            "zeroshot_avg": [0.50, 0.55, 0.52, 0.40, 0.45, 0.42],
            "perplexity": [20.0, 15.0, 18.0, 40.0, 30.0, 35.0],
            "kl_to_base": [0.2, 0.1, 0.15, 0.5, 0.3, 0.4],
            "wse_total": [2.0, 1.0, 1.5, 5.0, 0.0, 4.0],
        }
    )
    pair = matched(df, "qcqa", "gqa")
    assert len(pair) == 1 and pair.zeroshot_avg_diff.iloc[0] == pytest.approx(0.05)
    saving = kv_saving_at_quality(df)
    assert saving.qcqa_bytes_at_least_as_good.iloc[0] == 100 and saving.kv_saving.iloc[0] == pytest.approx(0.5)
    cla = matched(df, "cla", "mqa")
    assert cla.perplexity_diff.iloc[0] == pytest.approx(-10.0)
    rho = wse_rank_correlation(df).set_index("quality").spearman
    assert rho["perplexity"] == pytest.approx(1.0) and rho["zeroshot_avg"] == pytest.approx(-1.0)


def test_seed_means_and_cla_table():
    from kvshare.comparisons import cla_table1, matched, report, seed_means

    df = pd.DataFrame(
        {
            "model": ["m"] * 7,
            "variant": ["converted"] * 4 + ["pretrained"] * 3,
            "method": ["qcqa-ac", "random-s0", "random-s1", "random-s2", "mha", "mqa", "mqa+cla2"],
            "kv_bytes_per_token": [100, 100, 100, 100, 800, 100, 50],
            "kv_fraction": [0.5, 0.5, 0.5, 0.5, 1.0, 0.125, 0.0625],
            "perplexity": [20.0, 30.0, 34.0, 38.0, 10.0, 11.0, 12.0],
            "wse_total": [1.0, 3.0, 4.0, 5.0, None, None, None],
        }
    )
    means = seed_means(df)
    rnd = means[means.method == "random"].iloc[0]
    assert rnd.seeds == 3 and rnd.perplexity == pytest.approx(34.0) and rnd.perplexity_sd == pytest.approx(4.0)
    assert matched(means, "qcqa", "random").perplexity_diff.iloc[0] == pytest.approx(-14.0)
    table = cla_table1(df).set_index("layout")
    assert table.ppl_vs_mha["mqa+cla2"] == pytest.approx(1.2)
    assert table.paper_ppl_vs_mha["mqa+cla2"] == pytest.approx(13.60 / 13.15)
    assert table.paper_kv_fraction["mqa"] == pytest.approx(1 / 16)
    assert "CLA's Table 1" in report(df)
    # Without the MHA model's own evaluation, its identity conversion stands in.
    base = pd.DataFrame([{"model": "m", "variant": "converted", "method": "base", "perplexity": 10.0}])
    alone = pd.concat([df[df.method != "mha"], base], ignore_index=True)
    assert cla_table1(alone).set_index("layout").ppl_vs_mha["mqa+cla2"] == pytest.approx(1.2)


def test_strided_perplexity_scores_each_token_once_with_more_context():
    from kvshare.data import strided_windows as windows
    from kvshare.metrics import perplexity_and_agreement
    from tests.builders import tiny_llama

    model = tiny_llama(layers=2)
    tokens = np.arange(200) % 97
    full = windows(tokens, 40, 100)
    strided = windows(tokens, 40, 100, stride=10)
    assert len(full) == 5 and len(strided) == 17
    a = perplexity_and_agreement(model, full, 4)
    b = perplexity_and_agreement(model, strided, 4, stride=10)
    assert a["eval_tokens"] == 5 * 39 and b["eval_tokens"] == 39 + 16 * 10
    # with stride == seq_len both paths agree exactly
    c = perplexity_and_agreement(model, full, 2, stride=40)
    assert c["perplexity"] == pytest.approx(a["perplexity"], rel=1e-6)
    with pytest.raises(Exception, match="evaluate.stride=50"):
        windows(tokens, 40, 10, stride=50)
