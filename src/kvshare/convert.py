"""Stage ``convert``: base model + plan → a checkpoint whose KV cache really shrinks.

    python -m kvshare.convert convert.model_dir=resources/models/tiny \
        convert.plan=results/smoke/plans/tiny/gqa/0.5.json convert.out=results/smoke/checkpoints/tiny/gqa/0.5/converted

The checkpoint is written tensor by tensor (:func:`kvshare.merge.convert_tensors`):
only the attention projections change, everything else is copied through, in
the source's dtype unless ``convert.dtype`` names another, into safetensors
shards of at most ``convert.max_shard_size``. So memory holds one shard and one
layer's attention tensors, never the model: a 7B model converts on a laptop.

A plan with the same number of equal groups in every layer and no cross-layer
sharing is written as the source's own architecture (Llama, Mistral or Qwen2
with fewer KV heads, which transformers loads as is; :mod:`kvshare.export` writes
it, and per-layer counts, as GGUF for llama.cpp); any other as ``kvshare_llama``, which
loads with ``AutoModelForCausalLM.from_pretrained(path)`` once
``kvshare.modeling`` is imported, or without kvshare through the bundled
``modeling_kvshare.py`` and ``trust_remote_code=True``. Either way the folder
holds ``kvshare_spec.json`` (method, plan, source model, search and convert run ids).
"""

from __future__ import annotations

from omegaconf import DictConfig

from kvshare.checkpoint import (
    KVSHARE_MODEL_TYPE,
    SPEC,
    Tensors,
    check_free_space,
    parse_size,
    read_config,
    spec_text,
    write_folder,
)
from kvshare.cli import entry
from kvshare.errors import KVShareError
from kvshare.families import check_family
from kvshare.plan import ModelShape, Plan
from kvshare.tracking import stage_run

DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}


def run(cfg: DictConfig) -> dict:
    import torch

    from kvshare.merge import convert_tensors, converted_config, query_maps

    c = cfg.convert
    if c.dtype is not None and c.dtype not in DTYPES:
        raise KVShareError(f"convert.dtype={c.dtype!r} is not known; use float32, bfloat16, float16 or null")
    source = read_config(c.model_dir)
    check_family(source, f"convert.model_dir={c.model_dir}")
    plan = Plan.load(c.plan, expect=ModelShape.of(source))
    tensors = Tensors(c.model_dir)
    shard_bytes = parse_size(c.max_shard_size)
    scale = 1.0 if c.dtype is None else DTYPES[c.dtype] / 4  # bytes relative to a float32 source: an upper bound
    check_free_space(c.out, int(tensors.nbytes() * max(scale, 1.0)), f"convert.out={c.out}")
    maps = query_maps(plan, c.permute)
    config = converted_config(source, plan, maps, c.dtype)
    export = config["model_type"]
    tags = {"model": cfg.model.name, "method": plan.method, "budget": plan.meta.get("budget")}
    with stage_run(cfg, "convert", tags) as mlrun:
        mlrun.set_tags({"kvshare.input_runs": plan.meta.get("search_run_id", ""), "kvshare.export": export})
        spec = {
            "method": plan.method,
            "budget": plan.meta.get("budget"),
            "model": cfg.model.name,
            "source_model_dir": str(c.model_dir),
            "export": "kvshare_llama" if export == KVSHARE_MODEL_TYPE else export,
            "kv_fraction": plan.kv_fraction,
            "kv_bytes_per_token_16bit": plan.kv_bytes_per_token(2),
            "plan": plan.to_dict(),
            "runs": {"search": plan.meta.get("search_run_id"), "convert": mlrun.run_id},
        }
        dtype = getattr(torch, c.dtype) if c.dtype else None
        stream = convert_tensors(plan, tensors.names(), lambda n: tensors.torch(n) if n in tensors else None,
                                 c.permute, dtype)  # fmt: skip
        count = _counted(stream)
        write_folder(c.out, config, count, c.model_dir, shard_bytes, {SPEC: spec_text(spec)})
        mlrun.log_metrics(
            {"kv_fraction": plan.kv_fraction, "kv_bytes_per_token": plan.kv_bytes_per_token(2), "parameters": count.n}
        )
    return spec


class _counted:
    """An iterator of ``(name, tensor)`` that counts the weights passing through."""

    def __init__(self, stream):
        self.stream, self.n = stream, 0

    def __iter__(self):
        for name, t in self.stream:
            self.n += t.numel()
            yield name, t


main = entry("convert", run)

if __name__ == "__main__":
    main()
