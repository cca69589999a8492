"""The code's shape: stages stand on modules below them, functions stay short, stage imports stay light."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kvshare"
# A stage is a module with a Hydra entry point (`main = entry(...)`).
STAGES = sorted(p.stem for p in SRC.glob("*.py") if "main = entry(" in p.read_text())
MAX_LINES = 80
HEAVY = ("torch", "transformers", "mlflow", "pymoo", "matplotlib", "pandas", "scipy", "lm_eval", "datasets")


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return found


def test_the_stages_are_found():
    assert set(STAGES) >= {"prepare", "tokens", "search", "convert", "finetune", "pretrain", "evaluate", "pareto"}


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_another_stage(stage):
    others = {f"kvshare.{s}" for s in STAGES if s != stage}
    assert not imported_modules(SRC / f"{stage}.py") & others


def test_functions_are_short_or_say_why():
    long = []
    for path in SRC.rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                body = "\n".join(lines[node.lineno - 1 : node.end_lineno])
                if length > MAX_LINES and "# longer than" not in body:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({length} lines)")
    assert not long


@pytest.mark.parametrize("stage", STAGES)
def test_importing_a_stage_loads_nothing_heavy(stage):
    """Heavy libraries are imported where they are used, so a job's start-up is Python, Hydra and OmegaConf."""
    code = f"import json, sys, kvshare.{stage}; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert not [m for m in loaded if m.split(".")[0] in HEAVY]
