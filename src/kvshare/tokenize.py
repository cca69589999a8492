"""Stage ``tokenize``: a corpus → training and held-out token files for one model's tokenizer.

python -m kvshare.tokenize data=pydoc tokenize.model_dir=resources/models/tiny tokenize.out=resources/data/tiny/pydoc
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from kvshare.cli import entry
from kvshare.data import documents, tokenize_corpus
from kvshare.errors import KVShareError
from kvshare.tracking import stage_run


def run(cfg: DictConfig) -> dict:
    from transformers import AutoTokenizer

    if not (Path(cfg.tokenize.model_dir) / "config.json").exists():
        raise KVShareError(f"tokenize.model_dir={cfg.tokenize.model_dir} is not a model folder: run prepare first")
    with stage_run(cfg, "tokenize", {"model": cfg.model.name, "data": cfg.data.name}) as mlrun:
        tok = AutoTokenizer.from_pretrained(cfg.tokenize.model_dir)
        meta = tokenize_corpus(tok, documents(cfg.data), cfg.tokenize.out, cfg.tokenize.val_fraction)
        mlrun.log_metrics({f"{k}_tokens": v for k, v in meta["tokens"].items()})
        mlrun.log_metrics({f"{k}_documents": v for k, v in meta["documents"].items()})
    return meta


main = entry("tokenize", run)

if __name__ == "__main__":
    main()
