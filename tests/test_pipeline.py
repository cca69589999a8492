"""The real Snakemake DAG end to end on a tiny model, in a temporary folder."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "2", "--resources", "gpu=2"]
CONFIG = ["--configfile", str(REPO / "workflow" / "config" / "tiny.yaml")]
STAGES = ("prepare_model", "tokenize", "evaldata", "search", "convert", "finetune", "evaluate", "pareto")

pytestmark = pytest.mark.slow


def snakemake(workdir, *args, check=True):
    proc = subprocess.run([*SNAKEMAKE, "-d", str(workdir), *CONFIG, *args], capture_output=True, text=True)
    if check and proc.returncode:
        logs = "\n".join(p.read_text()[-2000:] for p in Path(workdir, "logs").rglob("*.log"))
        raise AssertionError(proc.stderr[-3000:] + logs)
    return proc


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dag")
    env_before = os.environ.pop("MLFLOW_TRACKING_URI", None)
    snakemake(workdir)
    yield workdir
    if env_before:
        os.environ["MLFLOW_TRACKING_URI"] = env_before


def test_dry_run_lists_every_stage(tmp_path):
    out = snakemake(tmp_path, "-n").stdout
    for stage in STAGES:
        assert f"rule {stage}:" in out


def test_dag_leaves_pareto_table_plot_and_a_run_per_job(done):
    results = done / "results" / "tiny"
    for name in ("pareto.csv", "pareto.md", "pareto_perplexity.png", "pareto_accuracy.png"):
        assert (results / name).stat().st_size > 0
    mlflow.set_tracking_uri(f"sqlite:///{done}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["tiny"])
    assert (runs.status == "FINISHED").all()
    assert runs["tags.kvshare.invocation"].nunique() == 1
    counts = runs["tags.kvshare.stage"].value_counts().to_dict()
    variants = 4  # base, gqa, qcqa-ac, cla2 in workflow/config/tiny.yaml
    assert counts == {
        "prepare": 1,
        "tokenize": 1,
        "evaldata": 1,
        "search": 4,
        "convert": 4,
        "finetune": 4,
        "evaluate": 8,
        "pareto": 1,
    }
    assert runs["params.study"].eq("tiny").all()
    evaluated = runs[runs["tags.kvshare.stage"] == "evaluate"]
    assert evaluated["metrics.perplexity"].notna().all() and len(evaluated) == 2 * variants
    assert evaluated["metrics.zeroshot_avg"].between(0, 1).all() and evaluated["metrics.n_piqa"].eq(8).all()
    assert set(evaluated["tags.kvshare.method"]) == {"base", "gqa", "qcqa-ac", "cla2"}
    lines = (results / "pareto.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * variants


def test_editing_a_stage_reruns_it(done):
    # A code file newer than the stage's output is what an edit looks like to Snakemake.
    old = time.time() - 3600
    os.utime(done / "results" / "tiny" / "pareto.csv", (old, old))
    out = snakemake(done, "-n").stdout
    assert "rule pareto:" in out and "rule evaluate:" not in out


def kill_matching(fragment: str) -> int:
    """SIGKILL every process whose command line contains ``fragment`` (as the OOM killer would); how many."""
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


def test_killed_job_is_redone_and_nothing_earlier_is_lost(done):
    ckpts = done / "results" / "tiny" / "checkpoints" / "tiny" / "gqa" / "0.5"
    plan = done / "results" / "tiny" / "plans" / "tiny" / "gqa" / "0.5.json"
    before = {p: p.stat().st_mtime for p in (plan, ckpts / "converted" / "model.safetensors")}
    subprocess.run(["rm", "-r", str(ckpts / "finetuned")], check=True)
    proc = subprocess.Popen(
        [*SNAKEMAKE, "-d", str(done), *CONFIG], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline, killed = time.time() + 120, 0
    while not killed and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        killed = kill_matching("finetune.out=results/tiny/checkpoints/tiny/gqa/0.5/finetuned")
    assert killed, "the finetune job never started"
    assert proc.wait() != 0  # Snakemake saw the job die
    assert not (ckpts / "finetuned").exists()  # nothing half-written
    snakemake(done)
    assert (ckpts / "finetuned" / "model.safetensors").exists()
    assert {p: p.stat().st_mtime for p in before} == before
