"""Stage ``convert``: base model + plan → a checkpoint whose KV cache really shrinks.

    python -m kvshare.convert convert.model_dir=resources/models/tiny \
        convert.plan=results/smoke/plans/tiny/gqa/0.5.json convert.out=results/smoke/checkpoints/tiny/gqa/0.5/converted

The checkpoint folder holds config, safetensors weights, tokenizer and
``kvshare_spec.json`` (method, plan, source model, search and convert run ids).
When every layer keeps the same number of equal groups and no layer shares
another's K/V, it is written as a plain Hugging Face Llama (servable by vLLM
or llama.cpp as is); otherwise as ``kvshare_llama``, which loads with
``AutoModelForCausalLM.from_pretrained(path)`` once ``kvshare`` is imported, or
without kvshare through the bundled ``modeling_kvshare.py`` and
``trust_remote_code=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from kvshare import modeling
from kvshare.cli import entry
from kvshare.errors import KVShareError
from kvshare.merge import convert_model, plain_llama_kv_heads, to_plain_llama
from kvshare.models import load_model, save_model
from kvshare.plan import ModelShape, Plan
from kvshare.tracking import stage_run

SPEC = "kvshare_spec.json"
REMOTE_CODE = "modeling_kvshare.py"


def read_spec(checkpoint: str | Path) -> dict:
    path = Path(checkpoint) / SPEC
    if not path.exists():
        raise KVShareError(f"{checkpoint} has no {SPEC}: it was not written by kvshare.convert or kvshare.finetune")
    return json.loads(path.read_text())


def run(cfg: DictConfig) -> dict:
    import torch

    c = cfg.convert
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(c.dtype)
    if dtype is None:
        raise KVShareError(f"convert.dtype={c.dtype!r} is not known; use float32, bfloat16 or float16")
    base, tok = load_model(c.model_dir)
    plan = Plan.load(c.plan, expect=ModelShape.of(base.config))
    tags = {"model": cfg.model.name, "method": plan.method, "budget": plan.meta.get("budget")}
    with stage_run(cfg, "convert", tags) as mlrun:
        mlrun.set_tags({"kvshare.input_runs": plan.meta.get("search_run_id", "")})
        model = convert_model(base, plan, permute=c.permute).to(dtype)
        export = "kvshare_llama"
        if plain_llama_kv_heads(model.config) is not None:
            model, export = to_plain_llama(model), "llama"
        else:
            model.config.auto_map = {
                "AutoConfig": f"{REMOTE_CODE[:-3]}.KVShareLlamaConfig",
                "AutoModelForCausalLM": f"{REMOTE_CODE[:-3]}.KVShareLlamaForCausalLM",
            }
        spec = {
            "method": plan.method,
            "budget": plan.meta.get("budget"),
            "model": cfg.model.name,
            "source_model_dir": str(c.model_dir),
            "export": export,
            "kv_fraction": plan.kv_fraction,
            "kv_bytes_per_token_16bit": plan.kv_bytes_per_token(2),
            "plan": plan.to_dict(),
            "runs": {"search": plan.meta.get("search_run_id"), "convert": mlrun.run_id},
        }
        extra = {SPEC: json.dumps(spec, indent=1) + "\n"}
        if export == "kvshare_llama":
            extra[REMOTE_CODE] = Path(modeling.__file__).read_text()
        save_model(model, tok, c.out, extra)
        mlrun.log_metrics(
            {
                "kv_fraction": plan.kv_fraction,
                "kv_bytes_per_token": plan.kv_bytes_per_token(2),
                "parameters": sum(p.numel() for p in model.parameters()),
            }
        )
        mlrun.set_tags({"kvshare.export": export})
    return spec


main = entry("convert", run)

if __name__ == "__main__":
    main()
