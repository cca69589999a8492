"""The real Snakemake DAG end to end on a tiny model, in a temporary folder."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvshare.tracking import runs_frame

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare_model", "tokenize", "evaldata", "search", "convert", "finetune", "evaluate", "pareto")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workflow_copy(tmp_path_factory):
    """The workflow's files in a temp folder, so a test can edit a stage's code without touching the repo."""
    root = tmp_path_factory.mktemp("repo")
    for name in ("Snakefile", "environment.yml"):
        shutil.copy(REPO / name, root)
    for folder in ("workflow", "conf", "src"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return root


def snakemake(workflow, workdir, *args, check=True, wait=True, grid="tiny"):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(workflow / "Snakefile"), "-d", str(workdir), "--cores", "2"]
    cmd += ["--resources", "gpu=2", "--configfile", str(workflow / "workflow" / "config" / f"{grid}.yaml"), *args]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode:
        logs = "\n".join(p.read_text()[-2000:] for p in Path(workdir, "logs").rglob("*.log"))
        raise AssertionError(proc.stderr[-3000:] + logs)
    return proc


@pytest.fixture(scope="module")
def done(workflow_copy, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dag")
    snakemake(workflow_copy, workdir)
    return workdir


def test_from_scratch_study_pretrains_layouts_and_searches_the_mha_model(workflow_copy, tmp_path):
    snakemake(workflow_copy, tmp_path, grid="tiny-scratch")
    runs = runs_frame(f"sqlite:///{tmp_path}/mlflow.db", experiment="tiny-scratch")
    pretrained = runs[runs["tags.kvshare.stage"] == "pretrain"]
    assert sorted(pretrained["tags.kvshare.method"]) == ["mha", "mqa+cla2"]
    # Every layout trained on the same token file.
    specs = [
        json.loads(p.read_text())
        for p in (tmp_path / "results" / "tiny-scratch").glob("pretrained/tiny/*/kvshare_spec.json")
    ]
    assert len(specs) == 2 and len({s["train_tokens_sha256"] for s in specs}) == 1
    plan = (tmp_path / "results" / "tiny-scratch" / "plans" / "tiny" / "qcqa-ac" / "0.5.json").read_text()
    assert '"method": "qcqa-ac"' in plan
    table = (tmp_path / "results" / "tiny-scratch" / "comparisons.md").read_text()
    assert "| tiny    | mqa+cla2 |" in table and "H128-MQA-CLA2" in table
    evaluated = runs[runs["tags.kvshare.stage"] == "evaluate"]
    assert sorted(evaluated["tags.kvshare.variant"]) == ["converted", "pretrained", "pretrained"]


def test_partial_study_tables_from_the_metrics_that_exist(workflow_copy, done, tmp_path):
    work = tmp_path / "copy"
    shutil.copytree(done, work, ignore=shutil.ignore_patterns(".snakemake"))
    (work / "results" / "tiny" / "metrics" / "tiny" / "gqa" / "0.5" / "finetuned.json").unlink()
    args = ("--config", "partial=true", "--allowed-rules", "pareto", "--forcerun", "pareto")
    out = snakemake(workflow_copy, work, *args).stderr
    assert "rule evaluate" not in out and "rule finetune" not in out
    table = (work / "results" / "tiny" / "pareto.csv").read_text().splitlines()
    assert len(table) - 1 == 7  # 4 variants x (converted, finetuned), less the one removed


def test_dry_run_lists_every_stage(workflow_copy, tmp_path):
    out = snakemake(workflow_copy, tmp_path, "-n").stdout
    for stage in STAGES:
        assert f"rule {stage}:" in out
    # Switches given on the command line arrive as text.
    out = snakemake(workflow_copy, tmp_path, "-n", "--config", "finetune=false").stdout
    assert "rule evaluate:" in out and "rule finetune:" not in out


def test_dag_leaves_pareto_table_plot_and_a_run_per_job(done):
    results = done / "results" / "tiny"
    for name in ("pareto.csv", "pareto.md", "comparisons.md", "pareto_perplexity.png", "pareto_accuracy.png"):
        assert (results / name).stat().st_size > 0
    runs = runs_frame(f"sqlite:///{done}/mlflow.db", experiment="tiny")
    assert (runs.status == "FINISHED").all()
    assert runs["tags.kvshare.invocation"].nunique() == 1
    counts = runs["tags.kvshare.stage"].value_counts().to_dict()
    variants = 4  # base, gqa, qcqa-ac, cla2 in workflow/config/tiny.yaml
    assert counts == {
        "prepare": 1,
        "tokenize": 1,
        "evaldata": 1,
        "search": variants,
        "convert": variants,
        "finetune": variants,
        "evaluate": 2 * variants,
        "pareto": 1,
    }
    assert runs["params.study"].eq("tiny").all()
    evaluated = runs[runs["tags.kvshare.stage"] == "evaluate"]
    assert evaluated["metrics.perplexity"].notna().all()
    assert evaluated["metrics.zeroshot_avg"].between(0, 1).all() and evaluated["metrics.n_piqa"].eq(8).all()
    assert set(evaluated["tags.kvshare.method"]) == {"base", "gqa", "qcqa-ac", "cla2"}
    assert evaluated["tags.kvshare.input_runs"].str.count(",").ge(1).all()  # search, convert (, finetune) ids
    lines = (results / "pareto.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * variants
    import pandas as pd

    table = pd.read_csv(results / "pareto.csv")  # CLA: every layer caches its own K/V in a serving engine
    cla, base = table[table.method == "cla2"], table[table.method == "base"]
    assert (cla.deployable_kv_bytes_per_token == 2 * cla.kv_bytes_per_token).all() and not cla.servable.any()
    assert (base.deployable_kv_bytes_per_token == base.kv_bytes_per_token).all() and base.servable.all()


def test_export_rule_writes_a_gguf_and_refuses_cla(workflow_copy, done):
    """Not a default target: asked for by path. GQA 0.5 of the 8-KV-head tiny model is plain GQA; CLA is refused."""
    target = "results/tiny/gguf/tiny/gqa/0.5/finetuned.q8_0.gguf"
    snakemake(workflow_copy, done, "--", target)  # "--": --configfile would take the target as a file
    assert (done / target).stat().st_size > 0
    refused = snakemake(workflow_copy, done, "--", "results/tiny/gguf/tiny/cla2/0.5/converted.f16.gguf", check=False)
    assert refused.returncode and not (done / "results/tiny/gguf/tiny/cla2").exists()
    log = (done / "logs" / "tiny" / "export" / "tiny_cla2_0.5_converted_f16.log").read_text().strip()
    assert log.startswith("kvshare export: error:") and "CLA" in log and len(log.splitlines()) == 1


def test_editing_a_stage_reruns_it(workflow_copy, done):
    assert "Nothing to be done" in snakemake(workflow_copy, done, "-n").stdout
    code = workflow_copy / "src" / "kvshare" / "pareto.py"
    original = code.read_text()
    code.write_text(original + "\n# an edit\n")
    try:
        out = snakemake(workflow_copy, done, "-n").stdout
    finally:
        code.write_text(original)
    assert "rule pareto:" in out and "rule evaluate:" not in out


# Which rules' configs compose each conf file under the tiny grid (scale smoke, data pydoc, model tiny).
COMPOSED_BY = {
    "common.yaml": set(STAGES),
    "model/tiny.yaml": {"prepare_model", "tokenize", "search", "convert"},
    "data/pydoc.yaml": {"prepare_model", "tokenize"},
    "search.yaml": {"search"},
    "search/paper.yaml": set(),  # a preset no rule selects
    "training/default.yaml": {"finetune"},  # and pretrain, which the tiny grid does not run
    "scale/smoke.yaml": {"search", "finetune", "evaluate"},
    "scale/finetune/smoke.yaml": {"finetune"},
    "scale/evaluate/gpu.yaml": set(),  # another scale
    "evaluate.yaml": {"evaluate"},
    "evaldata.yaml": {"evaldata"},
}


def jobs_of(dry_run: str) -> list[tuple[str, str]]:
    """(rule, the job's text: inputs, reason, ...) of each job a dry run lists."""
    return [(job.split(":")[0], job) for job in re.split(r"\n(?:local)?rule ", dry_run)[1:]]


def test_editing_a_conf_file_reruns_exactly_the_stages_that_compose_it(workflow_copy, done):
    # Which rules have each conf file among their inputs (every job of the DAG listed, with its inputs).
    everything = jobs_of(snakemake(workflow_copy, done, "-n", "--forceall").stdout)
    for name, expected in COMPOSED_BY.items():
        path = str(workflow_copy / "conf" / name)
        assert {rule for rule, job in everything if path in job} == expected, name
    # And an edit reruns them: a stage with nothing upstream to redo shows the edited file as its reason.
    for name, rule in (("scale/finetune/smoke.yaml", "finetune"), ("search.yaml", "search")):
        conf = workflow_copy / "conf" / name
        original, stat = conf.read_text(), conf.stat()
        conf.write_text(original + "\n# an edit\n")
        try:
            jobs = jobs_of(snakemake(workflow_copy, done, "-n").stdout)
        finally:
            conf.write_text(original)
            os.utime(conf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert {r for r, job in jobs if f"Updated input files: {conf}" in job} == {rule}, name
        assert {"prepare_model", "tokenize", "evaldata"}.isdisjoint(r for r, _ in jobs)


def kill_matching(fragment: str) -> int:
    """SIGKILL every finetune process whose command line contains ``fragment`` (as the OOM killer would)."""
    killed = 0
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if fragment in cmdline and "kvshare.finetune" in cmdline:
            os.kill(int(proc.name), signal.SIGKILL)
            killed += 1
    return killed


def test_killed_job_is_redone_and_nothing_earlier_is_lost(workflow_copy, done):
    ckpts = done / "results" / "tiny" / "checkpoints" / "tiny" / "gqa" / "0.5"
    plan = done / "results" / "tiny" / "plans" / "tiny" / "gqa" / "0.5.json"
    before = {p: p.stat().st_mtime for p in (plan, ckpts / "converted" / "model.safetensors")}
    # Remove a finetuned checkpoint and what was made from it, so the next run must make it again.
    shutil.rmtree(ckpts / "finetuned")
    (done / "results" / "tiny" / "metrics" / "tiny" / "gqa" / "0.5" / "finetuned.json").unlink()
    (done / "results" / "tiny" / "pareto.csv").unlink()
    proc = snakemake(workflow_copy, done, wait=False)
    deadline, killed = time.time() + 300, 0
    while not killed and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        killed = kill_matching("finetune.out=results/tiny/checkpoints/tiny/gqa/0.5/finetuned")
    assert killed, "the finetune job never started"
    assert proc.wait() != 0  # Snakemake saw the job die
    assert not (ckpts / "finetuned").exists()  # nothing half-written
    snakemake(workflow_copy, done)
    assert (ckpts / "finetuned" / "model.safetensors").exists()
    assert {p: p.stat().st_mtime for p in before} == before
