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
import torch

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
        raise KVShareError(f"tokenize.val_fraction={val_fraction} must be between 0 and 1")
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
        raise KVShareError(f"{path} does not exist: run kvshare.tokenize first (the tokenize rule)")
    return np.memmap(path, dtype=np.uint32, mode="r")


class Windows:
    """Window ``i`` of an endless seeded shuffle of the non-overlapping ``seq_len + 1`` windows of ``tokens``."""

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

    def batch(self, first: int, n: int) -> torch.Tensor:
        """Windows ``first .. first + n - 1`` as int64, shape (n, seq_len + 1)."""
        rows = [self.tokens[s : s + self.seq_len + 1] for s in (self.start(i) for i in range(first, first + n))]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def heldout_windows(tokens: np.ndarray, seq_len: int, n: int) -> torch.Tensor | None:
    """The first ``n`` non-overlapping windows of the held-out split (None if it holds none)."""
    n = min(n, (len(tokens) - 1) // seq_len)
    if n < 1:
        return None
    return torch.from_numpy(np.stack([tokens[w * seq_len : (w + 1) * seq_len + 1] for w in range(n)]).astype(np.int64))
