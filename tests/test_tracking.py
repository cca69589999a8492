"""Many jobs logging to one fresh SQLite store at once all land; a failed job says why."""

import subprocess
import sys

import mlflow
import pytest

from kvshare.errors import KVShareError
from kvshare.tracking import runs_frame, stage_run
from tests.builders import make_cfg

JOB = """
import sys
from hydra import compose, initialize_config_dir
from kvshare.cli import CONF_DIR
from kvshare.tracking import stage_run
with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
    cfg = compose("finetune", [f"mlflow.tracking_uri=sqlite:///{sys.argv[1]}/mlflow.db", "study=parallel"])
with stage_run(cfg, "probe", {"method": f"job{sys.argv[2]}"}) as run:
    for step in range(5):
        run.log_metrics({"x": step * int(sys.argv[2])}, step=step)
    run.log_metrics({"done": 1.0})
"""


def test_eight_parallel_jobs_on_a_fresh_store_all_land(tmp_path):
    procs = [
        subprocess.Popen([sys.executable, "-c", JOB, str(tmp_path), str(i)], stderr=subprocess.PIPE, text=True)
        for i in range(8)
    ]
    errors = [p.communicate()[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = runs_frame(uri, experiment="parallel")
    assert len(runs) == 8
    assert set(runs["tags.kvshare.method"]) == {f"job{i}" for i in range(8)}
    assert (runs["status"] == "FINISHED").all() and (runs["metrics.done"] == 1.0).all()
    assert "params.finetune.lr" in runs.columns  # the resolved config is logged as params
    client = mlflow.tracking.MlflowClient(uri)
    assert all(len(client.get_metric_history(r, "x")) == 5 for r in runs.run_id)


def test_a_failed_stage_keeps_its_error_in_mlflow(tmp_path):
    """A rerun overwrites the job's log: the FAILED run itself says why it failed."""
    cfg = make_cfg(tmp_path, "evaldata", "study=failing")
    with pytest.raises(KVShareError), stage_run(cfg, "probe"):
        raise KVShareError("finetune.micro_batch=64 does not fit: lower it")
    runs = runs_frame(f"sqlite:///{tmp_path}/mlflow.db", experiment="failing")
    assert list(runs["status"]) == ["FAILED"]
    assert list(runs["tags.kvshare.error"]) == ["KVShareError: finetune.micro_batch=64 does not fit: lower it"]


def test_a_store_deleted_while_its_service_runs_is_created_afresh(tmp_path):
    """`rm mlflow.db` between two runs: the service still holding the old file hands over to a new one."""
    cfg = make_cfg(tmp_path, "evaldata", "study=fresh")
    with stage_run(cfg, "probe") as first:
        first.log_metrics({"x": 1.0})
    (tmp_path / "mlflow.db").unlink()
    with stage_run(cfg, "probe") as second:
        second.log_metrics({"x": 2.0})
    runs = runs_frame(f"sqlite:///{tmp_path}/mlflow.db", experiment="fresh")
    assert list(runs.run_id) == [second.run_id] and list(runs["metrics.x"]) == [2.0]
