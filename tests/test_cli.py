"""Bad input ends in one line naming the value, exit status 2, and no output written."""

import json

import pytest

from kvshare import convert, evaluate, prepare, search
from kvshare.checkpoint import save_model
from kvshare.plan import ModelShape, Plan
from tests.builders import tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("model") / "tiny"
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    save_model(tiny_llama(heads=4, kv_heads=4, layers=2), tok, path)
    return path


def run_stage(stage, monkeypatch, capsys, tmp_path, *args):
    common = [f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.run.dir={tmp_path}/hydra"]
    monkeypatch.setattr("sys.argv", [stage.__name__, *common, *args])
    with pytest.raises(SystemExit) as exit_info:
        stage.main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "args, named",
    [
        (["search.method=foo", "search.budget=0.5"], "search.method='foo'"),
        (["search.method=gqa", "search.budget=abc"], "search.budget='abc'"),
        (["search.method=gqa", "search.budget=0.01"], "raise search.budget"),
        (["search.method=gqa", "search.budgt=0.5"], "search.budgt"),
        (["search.method=gqa", "model=nosuch"], "model/nosuch"),
        (["search.method=base", "search.cla_layers=[0,1,0]"], "CLA pattern has 3 entries but the model has 2"),
        (["search.method=base", "search.cla_layers=[1,1]"], "layer 0 uses the K/V of layer 1"),
    ],
)
def test_search_bad_input(args, named, model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "plan.json"
    err = run_stage(search, monkeypatch, capsys, tmp_path, f"search.model_dir={model_dir}", f"search.out={out}", *args)
    assert err.startswith("kvshare") and named in err
    assert not out.exists()


def test_missing_model_dir(tmp_path, monkeypatch, capsys):
    out = tmp_path / "plan.json"
    err = run_stage(
        search,
        monkeypatch,
        capsys,
        tmp_path,
        f"search.model_dir={tmp_path}/none",
        "search.method=gqa",
        f"search.out={out}",
    )
    assert f"{tmp_path}/none" in err and not out.exists()


def test_a_required_value_left_unset_is_named(tmp_path, monkeypatch, capsys):
    # conf/model/hf.yaml has `path: ???`: read only when the stage runs, after the up-front compose.
    out = tmp_path / "model"
    err = run_stage(prepare, monkeypatch, capsys, tmp_path, "model=hf", f"prepare.out={out}")
    assert "model.path is required" in err and not out.exists()


def plan_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize("case", ["other_model", "malformed", "later_layer"])
def test_convert_bad_plan(case, model_dir, tmp_path, monkeypatch, capsys):
    good = Plan.identity(ModelShape(2, 4, 4, 8)).to_dict()
    if case == "other_model":
        content, named = Plan.identity(ModelShape(3, 4, 4, 8)).to_dict(), "plan is for a model of shape"
    elif case == "malformed":
        content, named = '{"format": "kvshare.plan/1", "layers": [', "not valid JSON"
    else:
        good["layers"][0]["kv_layer"] = 1
        content, named = good, "layer 0 uses the K/V of layer 1"
    plan = plan_file(tmp_path, "plan.json", content)
    out = tmp_path / "ckpt"
    err = run_stage(
        convert,
        monkeypatch,
        capsys,
        tmp_path,
        f"convert.model_dir={model_dir}",
        f"convert.plan={plan}",
        f"convert.out={out}",
    )
    assert named in err and not out.exists()


def test_evaluate_needs_a_kvshare_checkpoint(model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.json"
    err = run_stage(
        evaluate,
        monkeypatch,
        capsys,
        tmp_path,
        f"evaluate.checkpoint={model_dir}",
        f"evaluate.base_dir={model_dir}",
        f"evaluate.data_dir={tmp_path}",
        f"evaluate.out={out}",
    )
    assert "kvshare_spec.json" in err and not out.exists()


def test_pareto_with_runs_missing_from_the_store(tmp_path, monkeypatch, capsys):
    from kvshare import pareto

    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"runs": {"evaluate": "0123456789abcdef"}}))
    out = tmp_path / "out"
    err = run_stage(pareto, monkeypatch, capsys, tmp_path, f"pareto.metrics=[{metrics}]", f"pareto.out_dir={out}")
    assert "0123456789abcdef" in err and "not in the MLflow store" in err
    assert not (out / "pareto.csv").exists()
