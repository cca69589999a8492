"""How fast stages start: the import of each stage module, a search job's wall time, and the smoke DAG.

    PYTHONPATH=src python benchmarks/startup_bench.py --model-dir resources/models/smollm2-135m [--dag] [--reps 5]

- imports: ``python -X importtime -c "import kvshare.<stage>"``, the module's cumulative
  import time, median over ``--reps`` fresh processes (bytecode already compiled);
- search jobs: ``python -m kvshare.search`` on the given model folder for each point of
  the smoke grid, wall time of the whole process, median over ``--reps`` runs, after one
  warm-up run that also starts the MLflow tracking service (later jobs connect to it);
- ``--dag``: a fresh ``git clone`` of this checkout, ``make setup``, then ``make run`` timed
  (the pip and KVSHARE_CACHE caches as they are on this machine).

Targets (issue 13): import ≤ 1.5 s per stage module, search job ≤ 5 s, smoke DAG ≤ 8 minutes,
on the 2-core CPU machine. Writes benchmarks/results/startup_bench.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvshare.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "tokens", "search", "convert", "finetune", "pretrain", "evaldata", "evaluate", "pareto")
SMOKE_GRID = [("gqa", 0.67), ("mqa", 0.34), ("qcqa-ac", 0.67), ("qcqa-ac", 0.5), ("cla2", 0.5), ("base", 1.0)]


def import_seconds(module: str) -> float:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True
    )
    line = [x for x in proc.stderr.splitlines() if re.search(rf"\|\s+{re.escape(module)}$", x)][-1]
    return int(line.split("|")[1]) / 1e6


def search_wall(model_dir: str, method: str, budget: float, work: Path) -> float:
    cmd = [sys.executable, "-m", "kvshare.search", "model=smollm2-135m", "study=startup", f"search.model_dir={model_dir}",
           f"search.method={method}", f"search.budget={budget}", f"search.out={work}/plan.json",
           f"hydra.run.dir={work}/hydra", "search.progress=false"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=work, check=True, capture_output=True)
    return time.perf_counter() - t0


def dag_seconds() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "kvshare"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        subprocess.run(["make", "setup"], cwd=clone, check=True, capture_output=True)
        t0 = time.perf_counter()
        subprocess.run(["make", "run"], cwd=clone, check=True, capture_output=True)
        return time.perf_counter() - t0


def report(results: dict) -> str:
    lines = [
        "# Stage start-up (issue 13)",
        "",
        f"Machine: {results['machine']}",
        "",
        f"Command: `{results['command']}`",
        "",
    ]
    lines += ["| stage module | import (s), median | target |", "|---|---|---|"]
    lines += [f"| kvshare.{s} | {v:.2f} | ≤ 1.5 |" for s, v in results["imports"].items()]
    lines += ["", "| search job on SmolLM2-135M | wall (s), median | target |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | ≤ 5 |" for k, v in results["search_jobs"].items()]
    if "dag_seconds" in results:
        lines += ["", f"Smoke DAG (`make run` in a fresh clone, after `make setup`): {results['dag_seconds'] / 60:.1f} "
                  "minutes (target ≤ 8)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", required=True, help="a prepared SmolLM2-135M folder (the prepare rule's output)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dag", action="store_true", help="also time `make run` in a fresh clone (minutes)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "startup_bench"))
    args = ap.parse_args()
    model_dir = str(Path(args.model_dir).resolve())
    results = {
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "command": " ".join(sys.argv),
        "imports": {s: statistics.median(import_seconds(f"kvshare.{s}") for _ in range(args.reps)) for s in STAGES},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        search_wall(model_dir, "gqa", 0.5, work)  # warm-up: bytecode and the tracking service
        results["search_jobs"] = {
            f"{m} {b}": statistics.median(search_wall(model_dir, m, b, work) for _ in range(args.reps))
            for m, b in SMOKE_GRID
        }
    if args.dag:
        results["dag_seconds"] = dag_seconds()
    atomic_write_text(f"{args.out}.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(f"{args.out}.md", report(results))
    print(report(results))


if __name__ == "__main__":
    main()
