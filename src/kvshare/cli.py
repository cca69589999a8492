"""Hydra entry points that fail with one line.

Every stage is ``python -m kvshare.<module> key=value ...``: a Hydra app whose
``main()`` only composes the stage's primary config (``conf/<stage>.yaml``,
built from the groups in conf/) and calls the stage's plain ``run(cfg)``.
Bad input (a :class:`KVShareError` from the stage, or an override Hydra cannot
apply) ends with a single ``kvshare <stage>: error: ...`` line on stderr and
exit status 2, instead of Hydra's multi-line report.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from kvshare.errors import KVShareError

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
EXIT_BAD_INPUT = 2


def fail(stage: str, message: str) -> None:
    print(f"kvshare {stage}: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _check_overrides(stage: str, args: list[str]) -> None:
    """Compose the config once up front so a bad override gets a one-line error.

    Sweeps (``-m``) and Hydra's own settings are left to Hydra itself.
    """
    if any(a in ("-m", "--multirun") for a in args):
        return
    overrides = [a for a in args if not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name=stage):
            compose(config_name=stage, overrides=overrides)
    except Exception as e:  # Hydra raises several unrelated types for bad overrides
        fail(stage, f"{e} {e.__cause__ or ''}")


def entry(stage: str, run: Callable[[DictConfig], object]) -> Callable[[], None]:
    """The ``main()`` of stage ``stage``: the composed ``conf/<stage>.yaml`` handed to ``run``."""

    @hydra.main(config_path=CONF_DIR, config_name=stage, version_base="1.3")
    def _app(cfg: DictConfig) -> None:
        try:
            run(cfg)
        except KVShareError as e:
            fail(stage, str(e))
        except MissingMandatoryValue as e:  # a `???` in conf/ that the command did not set, read where it is used
            fail(stage, f"{e.full_key} is required and not set: add {e.full_key}=... to the command")

    def main() -> None:
        # Keep stderr for what matters: weight-loading bars are noise here (read when transformers is imported).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        _check_overrides(stage, sys.argv[1:])
        _app()

    return main
