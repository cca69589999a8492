"""The device a stage runs on, from the config's ``device`` (auto | cpu | cuda | cuda:N)."""

from __future__ import annotations

from kvshare.errors import KVShareError


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KVShareError(f"device={name} but no CUDA device is visible: use device=cpu or run on a GPU machine")
    return torch.device(name)
