"""The process that talks to MLflow for every stage on this machine: ``python -m kvshare.tracking_service URI SOCKET``.

Importing MLflow and opening a SQLite store takes about 6 s of CPU on a
2-core machine (mlflow, SQLAlchemy, alembic), several times the work of a
search job. So stages do not import MLflow: :mod:`kvshare.tracking` starts
this service on first use, one per tracking URI, and sends it requests over a
Unix socket; it exits after ``KVSHARE_TRACKING_IDLE`` seconds (default 120)
without a client. Every call goes through MLflow's own client (runs, params,
metrics, tags, artifacts), one at a time; on SQLite each write also holds the
store's file lock, so stores shared between machines stay consistent.

Requests and replies are JSON lines: ``{"op": ..., **args}`` →
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import json
import os
import socketserver
import sys
import threading
import time
from pathlib import Path

from kvshare.tracking import sqlite_path, store_lock

IDLE_SECONDS = float(os.environ.get("KVSHARE_TRACKING_IDLE", "120"))


class Store:
    """MLflow calls for one tracking URI; the ops clients may ask for."""

    def __init__(self, uri: str):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        with store_lock(uri):
            self.client.search_experiments(max_results=1)  # creates a fresh store's tables before any client waits
        db = sqlite_path(uri)
        self.inode = os.stat(db).st_ino if db else None

    def stale(self) -> bool:
        """Whether the SQLite file was deleted or replaced since it was opened (``rm mlflow.db`` and a new run):
        the open connection would write to the old, unlinked file."""
        db = sqlite_path(self.uri)
        try:
            return db is not None and os.stat(db).st_ino != self.inode
        except FileNotFoundError:
            return True

    def experiment(self, name: str) -> str:
        """The experiment's id, created (with artifacts beside a SQLite store) if it does not exist."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        db = sqlite_path(self.uri)
        location = (db.parent.resolve() / "mlartifacts" / name).as_uri() if db else None
        return self.client.create_experiment(name, artifact_location=location)

    def create_run(self, experiment_id: str, tags: dict) -> str:
        return self.client.create_run(experiment_id, tags=tags).info.run_id

    def log_batch(self, run_id: str, metrics=(), params=None, tags=None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in metrics]
        params = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        while metrics or params or tags:  # MLflow takes at most 1000 metrics, 100 params, 100 tags per batch
            self.client.log_batch(run_id, metrics[:1000], params[:100], tags[:100])
            metrics, params, tags = metrics[1000:], params[100:], tags[100:]

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, path, artifact_path)

    def set_terminated(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)

    def search_runs(self, experiment: str | None, filter_string: str) -> list[dict]:
        """Runs as flat rows: ``run_id``, ``status``, ``tags.*``, ``params.*``, ``metrics.*``."""
        if experiment is None:
            ids = [e.experiment_id for e in self.client.search_experiments()]
        else:
            found = self.client.get_experiment_by_name(experiment)
            ids = [found.experiment_id] if found else []
        runs = self.client.search_runs(ids, filter_string, max_results=50000) if ids else []
        return [
            {
                "run_id": r.info.run_id,
                "status": r.info.status,
                **{f"tags.{k}": v for k, v in r.data.tags.items()},
                **{f"params.{k}": v for k, v in r.data.params.items()},
                **{f"metrics.{k}": v for k, v in r.data.metrics.items()},
            }
            for r in runs
        ]

    def ping(self) -> str:
        return "pong"


class Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = False  # server_close() waits for every accepted client to finish

    def __init__(self, path: str, store: Store):
        self.store, self.lock = store, threading.Lock()
        self.clients, self.last_seen = 0, time.monotonic()
        super().__init__(path, Handler)
        self.inode = os.stat(path).st_ino

    def unlink(self) -> None:
        """Remove the socket's name if it is still ours (a newer service may have taken the path)."""
        try:
            if os.stat(self.server_address).st_ino == self.inode:
                os.unlink(self.server_address)
        except FileNotFoundError:
            pass


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: Server = self.server
        with server.lock:
            server.clients += 1
        try:
            for line in self.rfile:
                request = json.loads(line)
                op = request.pop("op")
                if server.store.stale():  # the client starts a new service and asks it again
                    with server.lock:
                        server.unlink()
                    threading.Thread(target=server.shutdown, daemon=True).start()
                    self.wfile.write(json.dumps({"ok": False, "stale": True}).encode() + b"\n")
                    return
                try:
                    with server.lock, store_lock(server.store.uri):
                        result = getattr(server.store, op)(**request)
                    reply = {"ok": True, "result": result}
                except Exception as e:  # the client re-raises it; the service keeps serving
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                self.wfile.write(json.dumps(reply).encode() + b"\n")
        finally:
            with server.lock:
                server.clients -= 1
                server.last_seen = time.monotonic()


def _exit_when_idle(server: Server) -> None:
    while True:
        time.sleep(1.0)
        with server.lock:
            if server.clients == 0 and time.monotonic() - server.last_seen > IDLE_SECONDS:
                server.unlink()  # from now on a new client starts a new service
                break
    server.shutdown()


def serve(uri: str, socket_path: str) -> None:
    store = Store(uri)  # before binding: a client that connects finds a ready store
    Path(socket_path).unlink(missing_ok=True)  # a dead service's socket (the client holds the start lock)
    server = Server(socket_path, store)
    threading.Thread(target=_exit_when_idle, args=(server,), daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.unlink()
        server.server_close()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
