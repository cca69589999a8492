"""MLflow tracking for stages: one run per stage process, safe on a shared SQLite store.

The embedded default is a SQLite store (``sqlite:///mlflow.db``) with artifacts
in ``mlartifacts/`` beside it; ``MLFLOW_TRACKING_URI`` points every stage at a
team server instead. SQLite allows one writer at a time and MLflow's first use
of a fresh database creates its tables, which races when Snakemake starts many
jobs at once; so for SQLite every write here holds an exclusive file lock
(``<db>.lock``). Servers need no lock.

Runs are tagged with the stage, study, model, method, budget, the Snakemake
invocation (``KVSHARE_INVOCATION``, set once per ``snakemake`` call), the git
commit and the run ids of the stage's inputs, so the UI can show an invocation
as a unit and any number can be traced back to its lineage.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kvshare.errors import KVShareError

TAG = "kvshare."


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Exclusive lock on a SQLite store's lock file; nothing for other stores."""
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    # Import MLflow's SQL store before locking: the imports take 1-5 s per process, and inside
    # the lock they made every job that Snakemake started at once wait for all the others'.
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import mlflow.tracking  # noqa: F401

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def init_store(uri: str, experiment: str) -> str:
    """Create the store's tables and the experiment (once; idempotent). Returns the experiment id."""
    with store_lock(uri):
        client = _client(uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        db = _sqlite_path(uri)
        location = (db.parent.resolve() / "mlartifacts" / experiment).as_uri() if db else None
        return client.create_experiment(experiment, artifact_location=location)


def git_commit() -> str:
    """The checked-out commit of the kvshare source tree, with ``-dirty`` if it has uncommitted edits."""
    src = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=src, capture_output=True, text=True)
        return head + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class StageRun:
    """One MLflow run; every call holds the store lock (see module docstring)."""

    FLUSH_SECONDS = 10.0  # stepped metrics are written in batches: one locked write per step is slow

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self._pending: list = []
        self._last_flush = 0.0

    def _locked(self):
        return store_lock(self.uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        with self._locked():
            client = _client(self.uri)
            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log now, or for stepped metrics (``step`` given) at most every FLUSH_SECONDS; ``flush`` writes the rest."""
        from mlflow.entities import Metric

        now = time.time()
        self._pending += [Metric(k, float(v), int(now * 1000), step or 0) for k, v in metrics.items() if v is not None]
        if step is None or now - self._last_flush > self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        with self._locked():
            client = _client(self.uri)
            for i in range(0, len(self._pending), 1000):
                client.log_batch(self.run_id, metrics=self._pending[i : i + 1000])
        self._pending, self._last_flush = [], time.time()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        with self._locked():
            _client(self.uri).log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        with self._locked():
            _client(self.uri).log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(text)
            self.log_artifact(p)


def runs_frame(uri: str, filter_string: str = "", experiment: str | None = None):
    """Runs of one experiment (or all) as a DataFrame: ``run_id``, ``status``, ``tags.*``, ``params.*``, ``metrics.*``.

    Uses a client bound to ``uri``: ``mlflow.set_tracking_uri`` would also change the
    process environment that child jobs inherit.
    """
    import pandas as pd

    with store_lock(uri):
        client = _client(uri)
        if experiment is None:
            ids = [e.experiment_id for e in client.search_experiments()]
        else:
            found = client.get_experiment_by_name(experiment)
            ids = [found.experiment_id] if found else []
        runs = client.search_runs(ids, filter_string, max_results=50000) if ids else []
    rows = [
        {
            "run_id": r.info.run_id,
            "status": r.info.status,
            **{f"tags.{k}": v for k, v in r.data.tags.items()},
            **{f"params.{k}": v for k, v in r.data.params.items()},
            **{f"metrics.{k}": v for k, v in r.data.metrics.items()},
        }
        for r in runs
    ]
    return pd.DataFrame(rows, columns=None if rows else ["run_id", "status"])


def tracking_uri(cfg: DictConfig) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri
    if not uri:
        raise KVShareError("mlflow.tracking_uri is empty: set it or MLFLOW_TRACKING_URI")
    db = _sqlite_path(uri)
    return f"sqlite:///{db.resolve()}" if db else uri


@contextmanager
def stage_run(cfg: DictConfig, stage: str, tags: Mapping[str, Any] | None = None) -> Iterator[StageRun]:
    """Start the stage's MLflow run, log its resolved config, and close it FINISHED or FAILED."""
    uri = tracking_uri(cfg)
    experiment_id = init_store(uri, cfg.study)
    all_tags = {
        f"{TAG}stage": stage,
        f"{TAG}study": cfg.study,
        f"{TAG}invocation": os.environ.get("KVSHARE_INVOCATION", "manual"),
        f"{TAG}git_commit": git_commit(),
        "mlflow.runName": f"{stage}:{cfg.get('name', stage)}",
        **{f"{TAG}{k}": v for k, v in (tags or {}).items() if v is not None},
    }
    with store_lock(uri):
        run = _client(uri).create_run(experiment_id, tags={k: str(v) for k, v in all_tags.items()})
    stage_run_ = StageRun(uri, run.info.run_id)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    stage_run_.log_params(flatten(resolved))
    stage_run_.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    status = "FAILED"
    try:
        yield stage_run_
        status = "FINISHED"
    except BaseException as e:
        # The job's log may be overwritten by a rerun; the failed run keeps why it failed.
        stage_run_.set_tags({f"{TAG}error": f"{type(e).__name__}: {e}"[:5000]})
        raise
    finally:
        stage_run_.flush()
        with store_lock(uri):
            _client(uri).set_terminated(run.info.run_id, status)
