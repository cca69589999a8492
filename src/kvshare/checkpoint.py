"""The checkpoint folder: what kvshare reads and writes between stages, and how.

A checkpoint is a Hugging Face model folder: ``config.json``, weights in
safetensors (one ``model.safetensors``, or shards named by
``model.safetensors.index.json``, as ``save_pretrained`` writes them), the
tokenizer's files and ``generation_config.json``. kvshare adds:

- ``kvshare_spec.json`` (:data:`SPEC`) in every converted, fine-tuned or
  pretrained checkpoint: method, budget, the plan, the export format and the
  MLflow run ids of the stages that made it;
- ``kvshare_base.json`` (:data:`BASE_RECORD`) in a base model folder (prepare,
  or the MHA model of a from-scratch study);
- ``modeling_kvshare.py`` (:data:`REMOTE_CODE`) beside every ``kvshare_llama``
  config, so the folder loads with ``trust_remote_code=True`` without kvshare.

:class:`Tensors` reads weights one tensor at a time and :class:`ShardWriter`
writes them in shards of bounded size, so converting a 7B model needs memory
for one shard, not for the model. torch and transformers are imported only
where a function needs them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvshare.errors import KVShareError
from kvshare.io import atomic_dir

SPEC = "kvshare_spec.json"
BASE_RECORD = "kvshare_base.json"
REMOTE_CODE = "modeling_kvshare.py"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
KVSHARE_MODEL_TYPE = "kvshare_llama"
# Files of a model folder that are not carried over to a model derived from it (tokenizer files are).
# Written anew for each checkpoint; Snakemake's marker of a directory output belongs to the source alone.
_NOT_CARRIED = (CONFIG, INDEX, SPEC, BASE_RECORD, REMOTE_CODE, ".snakemake_timestamp")


def _json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise KVShareError(f"{path.parent} has no {path.name}: {what}") from None
    except json.JSONDecodeError as e:
        raise KVShareError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): rewrite or regenerate it") from None


def read_config(folder: str | Path) -> dict:
    """The folder's ``config.json`` as a dict; a one-line error if the folder is not a model folder."""
    folder = Path(folder)
    if not (folder / CONFIG).exists():
        raise KVShareError(f"{folder} is not a model folder (no config.json): run the prepare or convert rule first")
    return _json(folder / CONFIG, "run the prepare or convert rule first")


def read_spec(folder: str | Path) -> dict:
    return _json(Path(folder) / SPEC, "it was not written by kvshare.convert, kvshare.finetune or kvshare.pretrain")


def spec_text(spec: dict) -> str:
    return json.dumps(spec, indent=1) + "\n"


def remote_code_text() -> str:
    """The runtime module shipped beside a ``kvshare_llama`` config (it imports only torch and transformers)."""
    return (Path(__file__).parent / "modeling.py").read_text()


def auto_map() -> dict:
    stem = REMOTE_CODE.removesuffix(".py")
    return {
        "AutoConfig": f"{stem}.KVShareLlamaConfig",
        "AutoModelForCausalLM": f"{stem}.KVShareLlamaForCausalLM",
    }


def parse_size(size: str | int) -> int:
    """``"5GB"`` → 5e9 bytes (decimal units, as transformers' ``max_shard_size``); an int is bytes."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit) and text[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * factor)
    raise KVShareError(f"size {size!r} is not understood: write it as e.g. 5GB, 500MB or a number of bytes")


# --- reading weights -------------------------------------------------------------------------------------------


class Tensors:
    """The weights of a model folder, read one tensor at a time by name (safetensors, single file or sharded).

    Each read opens its file, copies the one tensor out and closes it again, so the
    memory a caller holds is the tensors it keeps, never a whole shard.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.exists():
            weight_map = _json(index, "regenerate the checkpoint").get("weight_map")
            if not isinstance(weight_map, dict):
                raise KVShareError(f"{index} has no weight_map: regenerate the checkpoint")
            self.file_of = {name: self.folder / f for name, f in weight_map.items()}
        elif (self.folder / WEIGHTS).exists():
            from safetensors import safe_open

            with safe_open(self.folder / WEIGHTS, framework="np") as f:
                self.file_of = {name: self.folder / WEIGHTS for name in f.keys()}
        else:
            raise KVShareError(
                f"{self.folder} holds no {WEIGHTS} or {INDEX}: kvshare reads safetensors weights "
                "(re-save the model with save_pretrained(safe_serialization=True))"
            )
        missing = sorted({p.name for p in self.file_of.values() if not p.exists()})
        if missing:
            raise KVShareError(
                f"{index} names {missing[0]}, which is not in {self.folder}: copy the missing shard "
                "or download the checkpoint again"
            )

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def names(self) -> list[str]:
        return list(self.file_of)

    def files(self) -> list[Path]:
        return sorted(set(self.file_of.values()))

    def info(self, name: str) -> tuple[str, list[int]]:
        """(safetensors dtype such as ``"BF16"``, shape) of a tensor, without reading it."""
        from safetensors import safe_open

        with safe_open(self.file_of[name], framework="np") as f:
            view = f.get_slice(name)
            return view.get_dtype(), list(view.get_shape())

    def torch(self, name: str):
        """The tensor as torch stores it (its own dtype), on the CPU."""
        from safetensors import safe_open

        # The tensor maps its bytes from the file (read when first touched), so reading is cheap and what
        # stays resident is what the caller touches and keeps.
        with safe_open(self.file_of[name], framework="pt") as f:
            return f.get_tensor(name)

    def float32(self, name: str):
        """The tensor as a float32 numpy array; torch is imported only for bfloat16, which numpy lacks."""
        import numpy as np

        dtype, _ = self.info(name)
        if dtype == "BF16":
            return self.torch(name).float().numpy()
        from safetensors import safe_open

        with safe_open(self.file_of[name], framework="np") as f:
            return np.array(f.get_tensor(name), dtype=np.float32)

    def _sizes(self) -> Iterator[tuple[int, str]]:
        """(element count, dtype) of every tensor, from the file headers."""
        import math

        from safetensors import safe_open

        for path in self.files():
            with safe_open(path, framework="np") as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    yield math.prod(view.get_shape()), view.get_dtype()

    def numel(self) -> int:
        """Number of weights (tied ones once: a tied LM head is not stored)."""
        return sum(n for n, _ in self._sizes())

    def nbytes(self) -> int:
        return sum(n * DTYPE_BYTES[dtype] for n, dtype in self._sizes())


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


# --- writing weights -------------------------------------------------------------------------------------------


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` each (a larger tensor gets one of its own),
    then names them and writes the index as ``save_pretrained`` does: one ``model.safetensors`` when one shard
    suffices, else ``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), int(max_bytes)
        self.pending: dict[str, Any] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, self.folder / f".shard-{len(self.shards):05d}", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            (self.folder / ".shard-00000").rename(self.folder / WEIGHTS)
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f".shard-{i:05d}").rename(self.folder / final)
            weight_map |= dict.fromkeys(names, final)
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def check_free_space(folder: str | Path, needed: int, what: str) -> None:
    """A one-line error, before anything is written, when the disk holding ``folder`` lacks ``needed`` bytes."""
    folder = Path(folder).resolve()
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise KVShareError(
            f"{what} needs {needed / 1e9:.1f} GB but the disk holding {folder} has {free / 1e9:.1f} GB free: "
            "free some space or write the output elsewhere"
        )


def carried_files(source: str | Path) -> Iterator[Path]:
    """The source folder's tokenizer and generation files: what a derived model folder copies unchanged."""
    for path in sorted(Path(source).iterdir()):
        if path.is_file() and path.name not in _NOT_CARRIED and not path.name.endswith((".safetensors", ".bin")):
            yield path


def write_folder(out: str | Path, config: dict, tensors: Iterator[tuple[str, Any]], source: str | Path,
                 max_shard_bytes: int, extra: dict[str, str] | None = None) -> None:  # fmt: skip
    """Write a model folder atomically: ``config``, the ``(name, tensor)`` stream in shards, the source's
    tokenizer files, and ``extra`` text files (the spec; the remote code is added for ``kvshare_llama``)."""
    extra = dict(extra or {})
    if config.get("model_type") == KVSHARE_MODEL_TYPE:
        extra[REMOTE_CODE] = remote_code_text()
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, tensor in tensors:
            writer.add(name, tensor)
        writer.close()
        for path in carried_files(source):
            shutil.copy2(path, tmp / path.name)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, text in extra.items():
            (tmp / name).write_text(text)


# --- whole models --------------------------------------------------------------------------------------------


def save_model(model, tokenizer, out: str | Path, extra: dict[str, str] | None = None) -> None:
    """Write a model object, its tokenizer and ``extra`` text files atomically (the remote code is added for a
    ``kvshare_llama`` model, with ``auto_map`` in its config so it loads without kvshare)."""
    extra = dict(extra or {})
    if model.config.model_type == KVSHARE_MODEL_TYPE:
        model.config.auto_map = auto_map()
        extra[REMOTE_CODE] = remote_code_text()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        for name, text in extra.items():
            (tmp / name).write_text(text)


def load_model(path: str | Path, device="cpu", dtype=None):
    """A base or converted checkpoint and its tokenizer; ``dtype`` None keeps the stored one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kvshare.modeling  # noqa: F401  (registers kvshare_llama with the Auto classes)

    read_config(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)
