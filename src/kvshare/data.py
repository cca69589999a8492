"""Text corpora, their token files, and the token windows training reads from them.

A corpus is a sequence of documents. Each document goes wholly to the training
or the held-out split, chosen by a stable hash of its text, so the splits never
share a document and the split does not depend on file order. Token files are
flat ``uint32`` arrays (documents joined by the EOS token) read back as
memory maps. Training (:mod:`kvshare.training`) cuts them into non-overlapping
windows of ``seq_len + 1`` tokens: :class:`Windows` visits the training split's
in a seeded random order, :func:`heldout_windows` takes the held-out split's first.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kvshare.errors import KVShareError
from kvshare.io import atomic_dir


def documents(data_cfg) -> Iterator[str]:
    if data_cfg.source == "pydoc":
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield topics[key]
    elif data_cfg.source == "textdir":
        root = Path(data_cfg.path)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith((".txt", ".txt.xz", ".jsonl")))
        if not files:
            raise KVShareError(f"data.path={root} holds no .txt, .txt.xz or .jsonl files")
        for p in files:
            if p.name.endswith(".jsonl"):
                for line in p.read_text().splitlines():
                    if line.strip():
                        yield json.loads(line)["text"]
            elif p.name.endswith(".xz"):
                yield lzma.open(p, "rt", errors="replace").read()
            else:
                yield p.read_text(errors="replace")
    else:
        raise KVShareError(f"data.source={data_cfg.source!r} is not known; use pydoc or textdir")


def is_heldout(text: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return h / 2**64 < val_fraction


def tokenize_corpus(tokenizer, docs, out_dir: str | Path, val_fraction: float) -> dict:
    """Write ``train.bin`` and ``val.bin`` (uint32 tokens) and ``meta.json``; return the meta."""
    if not 0 < val_fraction < 1:
        raise KVShareError(f"data.val_fraction={val_fraction} must be between 0 and 1")
    eos = tokenizer.eos_token_id
    splits: dict[str, list[int]] = {"train": [], "val": []}
    n_docs = {"train": 0, "val": 0}
    for text in docs:
        split = "val" if is_heldout(text, val_fraction) else "train"
        splits[split].extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])
        n_docs[split] += 1
    if not splits["train"] or not splits["val"]:
        raise KVShareError(
            f"the corpus split left an empty part ({n_docs}): use more documents or another val_fraction"
        )
    meta = {
        "tokens": {k: len(v) for k, v in splits.items()},
        "documents": n_docs,
        "vocab_size": len(tokenizer),
        "eos_token_id": eos,
        "val_fraction": val_fraction,
    }
    with atomic_dir(out_dir) as tmp:
        for k, v in splits.items():
            np.asarray(v, dtype=np.uint32).tofile(tmp / f"{k}.bin")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def load_tokens(data_dir: str | Path, split: str) -> np.ndarray:
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists():
        raise KVShareError(
            f"{path} does not exist: run the tokenize stage first (python -m kvshare.tokens, rule tokenize)"
        )
    return np.memmap(path, dtype=np.uint32, mode="r")


# --- windows: fixed-length slices of a token file, as int64 tensors (shape (n, length)) -------------------------


def cut(tokens: np.ndarray, starts, length: int):
    """The windows of ``length`` tokens at ``starts``, stacked: the one place token windows are cut."""
    import torch

    return torch.from_numpy(np.stack([np.asarray(tokens[s : s + length], dtype=np.int64) for s in starts]))


class Windows:
    """Training windows: window ``i`` of an endless seeded shuffle of the non-overlapping ``seq_len + 1`` windows
    of ``tokens``. The windows of step ``s`` depend on (seed, s) alone, so a resumed run, a run on any number of
    GPUs and every model trained on the same token files see the same tokens."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, section: str = "finetune"):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.count = (len(tokens) - 1) // seq_len
        if self.count < 1:
            raise KVShareError(f"{section}.seq_len={seq_len} needs more than {len(tokens)} training tokens: lower it")
        self._epoch, self._order = -1, None

    def start(self, i: int) -> int:
        epoch, pos = divmod(i, self.count)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.count)
        return int(self._order[pos]) * self.seq_len

    def batch(self, first: int, n: int):
        """Windows ``first .. first + n - 1``, shape (n, seq_len + 1)."""
        return cut(self.tokens, [self.start(i) for i in range(first, first + n)], self.seq_len + 1)


def heldout_windows(tokens: np.ndarray, seq_len: int, n: int):
    """The first ``n`` non-overlapping ``seq_len + 1`` windows of the held-out split (None if it holds none):
    the training loop's held-out loss."""
    n = min(n, (len(tokens) - 1) // seq_len)
    return cut(tokens, range(0, n * seq_len, seq_len), seq_len + 1) if n >= 1 else None


def strided_windows(tokens: np.ndarray, seq_len: int, max_windows: int, stride: int | None = None):
    """Held-out windows of ``seq_len`` tokens starting every ``stride`` (default: ``seq_len``) tokens: evaluation."""
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise KVShareError(f"evaluate.stride={stride} must be between 1 and evaluate.seq_len={seq_len}")
    n = min(max_windows, (len(tokens) - seq_len) // stride + 1) if len(tokens) >= seq_len else 0
    if n < 1:
        raise KVShareError(f"evaluate.seq_len={seq_len} is longer than the {len(tokens)} held-out tokens: lower it")
    return cut(tokens, range(0, n * stride, stride), seq_len)


def calibration_windows(data_dir: str | Path, n_tokens: int, seq_len: int, offset: int = 0):
    """``n_tokens`` of the training split from ``offset`` on, as whole windows of ``seq_len``: the search's proxies."""
    tokens = load_tokens(data_dir, "train")[int(offset) :]
    n = min(int(n_tokens), len(tokens)) // int(seq_len)
    if n < 1:
        raise KVShareError(
            f"search.calibration: {len(tokens)} training tokens left in {data_dir} (from token {offset}) do not "
            f"fill one window of seq_len={seq_len}: lower search.calibration.seq_len or the token counts"
        )
    return cut(tokens, range(0, n * seq_len, seq_len), seq_len)
