"""What a stage's output depends on besides its data: the source files it imports and the conf files it composes.

The Snakefile makes both inputs of each rule, so editing a module reruns exactly
the stages whose code imports it (directly or through other kvshare modules,
including imports inside functions), and editing a conf file reruns exactly the
stages whose config composes it with the job's overrides. Both are read from the
code and from Hydra's defaults list, never listed by hand.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

SRC = Path(__file__).resolve().parent
CONF = SRC.parents[1] / "conf"


@cache
def _imports(module: str) -> frozenset[str]:
    """The kvshare modules ``module`` imports anywhere in its file (top level or inside functions)."""
    path = SRC.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from kvshare import proxy`
    return frozenset(m for m in found if m.split(".")[0] == "kvshare" and _file(m) is not None)


def _file(module: str) -> Path | None:
    path = SRC.joinpath(*module.split(".")[1:])
    if path.is_dir() and (path / "__init__.py").exists():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else None


def source_files(module: str) -> list[str]:
    """The files of ``module`` (e.g. ``kvshare.search``) and of every kvshare module it reaches by imports,
    with the packages they belong to."""
    seen, todo = set(), [module, "kvshare"]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += _imports(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b runs a/__init__.py
    return sorted(str(_file(m)) for m in seen if _file(m) is not None)


def conf_files(stage: str, overrides: list[str]) -> list[str]:
    """The conf files that ``conf/<stage>.yaml`` composes under ``overrides`` (Hydra's own defaults list)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        defaults = loader.compute_defaults_list(stage, overrides, RunMode.RUN).defaults
    paths = {d.config_path for d in defaults if d.config_path and not d.config_path.startswith("hydra/")}
    return sorted(str(CONF / f"{p}.yaml") for p in paths if (CONF / f"{p}.yaml").exists())
