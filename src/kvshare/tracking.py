"""MLflow tracking for stages: one run per stage process, logged through a shared per-machine service.

The embedded default is a SQLite store (``sqlite:///mlflow.db``) with artifacts
in ``mlartifacts/`` beside it; ``MLFLOW_TRACKING_URI`` points every stage at a
team server instead. Stages never import MLflow themselves: the calls go to
:mod:`kvshare.tracking_service`, started on first use, one per URI and
machine, which keeps MLflow imported and the store open for every job of a
DAG (it costs ~6 s of CPU per process on a 2-core machine otherwise). The
service writes one call at a time, so parallel jobs never race on SQLite.

Runs are tagged with the stage, study, model, method, budget, the Snakemake
invocation (``KVSHARE_INVOCATION``, set once per ``snakemake`` call), the git
commit and the run ids of the stage's inputs, so the UI can show an invocation
as a unit and any number can be traced back to its lineage.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kvshare.errors import KVShareError

TAG = "kvshare."
START_SECONDS = 120.0  # how long a client waits for a new service to come up


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Exclusive lock on a SQLite store's lock file (also across machines sharing it); nothing for other stores."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- the connection to the service -------------------------------------------------------------------------------


def _socket_path(uri: str) -> Path:
    """One service per URI, interpreter and service code: a changed service file never talks to an old one."""
    code = (Path(__file__).parent / "tracking_service.py").read_bytes()
    key = hashlib.sha1(b"\0".join([uri.encode(), sys.executable.encode(), code])).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"kvshare-mlflow-{os.getuid()}-{key}.sock"


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError:
        sock.close()
        return None


class Service:
    """A connection to the tracking service of ``uri``, started (detached) when none is running."""

    def __init__(self, uri: str):
        self.uri, self.path = uri, _socket_path(uri)
        self.sock = _connect(self.path) or self._start()
        self.reader = self.sock.makefile("rb")

    def _start(self) -> socket.socket:
        with open(f"{self.path}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one starter; the others find its service
            sock = _connect(self.path)
            if sock is not None:
                return sock
            log = Path(f"{self.path}.log")
            with open(log, "w") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "kvshare.tracking_service", self.uri, str(self.path)],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                )  # fmt: skip
            deadline = time.monotonic() + START_SECONDS
            while time.monotonic() < deadline:
                sock = _connect(self.path)
                if sock is not None:
                    return sock
                if proc.poll() is not None:
                    tail = (log.read_text().strip().splitlines() or ["no output"])[-1]
                    raise KVShareError(f"the MLflow tracking service for {self.uri} stopped: {tail} (log: {log})")
                time.sleep(0.05)
            raise KVShareError(
                f"the MLflow tracking service for {self.uri} did not start in {START_SECONDS:.0f} s: see {log}"
            )

    def call(self, op: str, **args) -> Any:
        self.sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        line = self.reader.readline()
        if not line:
            raise KVShareError(f"the MLflow tracking service for {self.uri} went away: see {self.path}.log")
        reply = json.loads(line)
        if reply.get("stale"):  # the store file was replaced since the service opened it: a new service
            self.close()
            self.sock = self._start()
            self.reader = self.sock.makefile("rb")
            return self.call(op, **args)
        if not reply["ok"]:
            raise RuntimeError(f"MLflow {op} failed: {reply['error']}")
        return reply["result"]

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@contextmanager
def service(uri: str) -> Iterator[Service]:
    s = Service(uri)
    try:
        yield s
    finally:
        s.close()


# --- what stages and the Snakefile use ----------------------------------------------------------------------------


def tracking_uri(cfg) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri
    if not uri:
        raise KVShareError("mlflow.tracking_uri is empty: set it or MLFLOW_TRACKING_URI")
    db = sqlite_path(uri)
    return f"sqlite:///{db.resolve()}" if db else uri


def init_store(uri: str, experiment: str) -> str:
    """Create the store's tables and the experiment (once; idempotent). Returns the experiment id."""
    with service(uri) as s:
        return s.call("experiment", name=experiment)


def runs_frame(uri: str, filter_string: str = "", experiment: str | None = None):
    """Runs of one experiment (or all) as a DataFrame: ``run_id``, ``status``, ``tags.*``, ``params.*``, ``metrics.*``."""
    import pandas as pd

    with service(uri) as s:
        rows = s.call("search_runs", experiment=experiment, filter_string=filter_string)
    return pd.DataFrame(rows, columns=None if rows else ["run_id", "status"])


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
    """One MLflow run of a stage process."""

    FLUSH_SECONDS = 10.0  # stepped metrics go in batches: a store write per training step would be slow

    def __init__(self, svc: Service, run_id: str):
        self.svc, self.run_id = svc, run_id
        self._pending: list = []
        self._last_flush = 0.0

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.svc.call("log_batch", run_id=self.run_id, params={k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log now, or for stepped metrics (``step`` given) at most every FLUSH_SECONDS; ``flush`` writes the rest."""
        now = time.time()
        self._pending += [(k, float(v), int(now * 1000), step or 0) for k, v in metrics.items() if v is not None]
        if step is None or now - self._last_flush > self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.svc.call("log_batch", run_id=self.run_id, metrics=self._pending)
        self._pending, self._last_flush = [], time.time()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.svc.call("log_batch", run_id=self.run_id, tags={k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.svc.call("log_artifact", run_id=self.run_id, path=str(Path(path).resolve()), artifact_path=artifact_path)

    def log_text(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(text)
            self.log_artifact(p)


class NoRun:
    """What processes that do not log (ranks other than 0 under torchrun) get instead of a run."""

    run_id = None

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def set_tags(self, tags) -> None:
        pass

    def log_artifact(self, path, artifact_path=None) -> None:
        pass


@contextmanager
def stage_run(cfg, stage: str, tags: Mapping[str, Any] | None = None, enabled: bool = True) -> Iterator[StageRun]:
    """Start the stage's MLflow run, log its resolved config, and close it FINISHED or FAILED (keeping the error).

    With ``enabled`` false (a rank other than 0) nothing is logged: a :class:`NoRun` stands in.
    """
    if not enabled:
        yield NoRun()
        return
    from omegaconf import OmegaConf

    uri = tracking_uri(cfg)
    all_tags = {
        f"{TAG}stage": stage,
        f"{TAG}study": cfg.study,
        f"{TAG}invocation": os.environ.get("KVSHARE_INVOCATION", "manual"),
        f"{TAG}git_commit": git_commit(),
        "mlflow.runName": f"{stage}:{cfg.get('name', stage)}",
        **{f"{TAG}{k}": v for k, v in (tags or {}).items() if v is not None},
    }
    with service(uri) as svc:
        experiment = svc.call("experiment", name=cfg.study)
        run = StageRun(
            svc, svc.call("create_run", experiment_id=experiment, tags={k: str(v) for k, v in all_tags.items()})
        )
        run.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
        run.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        except BaseException as e:
            # The job's log may be overwritten by a rerun; the failed run keeps why it failed.
            run.set_tags({f"{TAG}error": f"{type(e).__name__}: {e}"[:5000]})
            raise
        finally:
            run.flush()
            svc.call("set_terminated", run_id=run.run_id, status=status)
