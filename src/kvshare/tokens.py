"""Stage ``tokenize``: a corpus → training and held-out token files for one model's tokenizer.

    python -m kvshare.tokens model=tiny data=pydoc tokenize.model_dir=resources/models/tiny \
        tokenize.out=resources/data/tiny/pydoc

(The module is not called ``tokenize``: that would shadow Python's own module of the name.)
"""

from __future__ import annotations

from omegaconf import DictConfig

from kvshare.checkpoint import read_config
from kvshare.cli import entry
from kvshare.data import documents, tokenize_corpus
from kvshare.tracking import stage_run


def run(cfg: DictConfig) -> dict:
    from transformers import AutoTokenizer

    read_config(cfg.tokenize.model_dir)  # a one-line error if it is not a model folder
    with stage_run(cfg, "tokenize", {"model": cfg.model.name, "data": cfg.data.name}) as mlrun:
        tok = AutoTokenizer.from_pretrained(cfg.tokenize.model_dir)
        meta = tokenize_corpus(tok, documents(cfg.data), cfg.tokenize.out, cfg.data.val_fraction)
        mlrun.log_metrics({f"{k}_tokens": v for k, v in meta["tokens"].items()})
        mlrun.log_metrics({f"{k}_documents": v for k, v in meta["documents"].items()})
    return meta


main = entry("tokenize", run)

if __name__ == "__main__":
    main()
