"""What a benchmark ran on: versions, device, driver and the command, for its recorded results."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

import torch
import transformers


def environment(device: torch.device | str, packages: tuple[str, ...] = ()) -> dict:
    device = torch.device(device)
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "argv": " ".join(sys.argv),
    }
    for pkg in packages:
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = "?"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device.index or 0)
        env.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
        try:
            env["driver"] = (
                subprocess.run(  # one line per GPU, all the same
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                )
                .stdout.split("\n")[0]
                .strip()
            )
        except OSError:
            pass
    return env
