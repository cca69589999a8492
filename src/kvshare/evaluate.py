"""Stage ``evaluate``: a converted or fine-tuned checkpoint → quality and KV-size metrics.

    python -m kvshare.evaluate evaluate.checkpoint=.../converted evaluate.base_dir=resources/models/tiny \
        evaluate.data_dir=resources/data/tiny/pydoc evaluate.out=results/smoke/metrics/tiny/gqa/0.5/converted.json

Measures held-out perplexity, KL to the base model and top-1 agreement;
zero-shot accuracy on lm-eval tasks (offline, see :mod:`kvshare.zeroshot`); KV
bytes per token (analytic, 16-bit) and its fraction of the base model's; and
the bytes the KV cache really holds after a forward over one window, which must
equal the analytic size. Writes a JSON summary (with the lineage of run ids)
and logs everything to MLflow.
"""

from __future__ import annotations

import time

from omegaconf import DictConfig, OmegaConf

from kvshare.checkpoint import read_spec
from kvshare.cli import entry
from kvshare.errors import KVShareError
from kvshare.io import atomic_write_json
from kvshare.plan import Plan
from kvshare.serving import Layout, deployable_kv_bytes_per_token
from kvshare.tracking import stage_run

DTYPES = ("float32", "bfloat16", "float16")
VARIANTS = ("converted", "finetuned", "pretrained")
# The metric each task is usually reported by; their mean is the zero-shot average.
PRIMARY = {"hellaswag": "acc_norm", "piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm"}


def zeroshot_metrics(model, tokenizer, e: DictConfig, device) -> dict:
    """Flat ``<metric>_<task>`` scores and their ``zeroshot_avg`` (empty when no task is configured)."""
    if not e.tasks:
        return {}
    if OmegaConf.is_missing(e, "eval_data_dir"):
        raise KVShareError("evaluate.eval_data_dir is not set: run the evaldata stage first, or set evaluate.tasks=[]")
    from kvshare.zeroshot import run_zeroshot

    scores = run_zeroshot(
        model,
        tokenizer,
        list(e.tasks),
        e.eval_data_dir,
        limit=e.limit,
        batch_size=e.zeroshot_batch_size,
        device=str(device),
    )
    flat = {f"{metric}_{task}": value for task, per in scores.items() for metric, value in per.items()}
    flat["zeroshot_avg"] = sum(scores[t][PRIMARY.get(t.removeprefix("hub_"), "acc")] for t in scores) / len(scores)
    return flat


def measured_cache_bytes_per_token(model, window) -> float:
    """Cache bytes per token after one forward with a fresh cache, at the model's own dtype."""
    import torch

    from kvshare.modeling import cache_bytes

    with torch.no_grad():
        out = model(input_ids=window[None], use_cache=True)
    return cache_bytes(out.past_key_values) / window.numel()


def model_dtype(name: str, device):
    """``evaluate.dtype``: auto is bfloat16 on CUDA (half the memory of float32, and what serving uses), else float32."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise KVShareError(f"evaluate.dtype={name!r} is not known; use auto, {', '.join(DTYPES)}")
    return getattr(torch, name)


def fit_both(e: DictConfig, device, dtype) -> bool:
    """``evaluate.kl``: whether the base model stays on the device beside the variant (``resident``), or its
    logits are taken first and kept on the host (``sequential``); ``auto`` keeps both where their weights
    and a batch's float32 logits fit in the free device memory with a fifth to spare."""
    if e.kl not in ("auto", "resident", "sequential"):
        raise KVShareError(f"evaluate.kl={e.kl!r} is not known; use auto, resident or sequential")
    if e.kl != "auto" or device.type != "cuda":
        return e.kl != "sequential"
    import torch

    from kvshare.checkpoint import Tensors, read_config

    weights = (Tensors(e.checkpoint).numel() + Tensors(e.base_dir).numel()) * dtype.itemsize
    logits = 3 * 4 * e.batch_size * e.seq_len * read_config(e.base_dir)["vocab_size"]
    return weights + logits < 0.8 * torch.cuda.mem_get_info(device)[0]


def quality(e: DictConfig, batches, device, dtype) -> tuple:
    """The variant (loaded), its tokenizer and its perplexity, KL and top-1 agreement against the base model,
    with ``quality_seconds``: the forward passes of both models over the windows, loading excluded."""
    from kvshare.checkpoint import load_model
    from kvshare.metrics import base_logits, perplexity_and_agreement

    if fit_both(e, device, dtype):
        model, tokenizer = load_model(e.checkpoint, device, dtype)
        base, _ = load_model(e.base_dir, device, dtype)
        t0 = time.perf_counter()
        metrics = perplexity_and_agreement(model, batches, e.batch_size, base, device, e.stride)
        return model, tokenizer, metrics | {"quality_seconds": time.perf_counter() - t0}
    base, _ = load_model(e.base_dir, device, dtype)
    t0 = time.perf_counter()
    reference = base_logits(base, batches, e.batch_size, device)
    seconds = time.perf_counter() - t0
    del base  # the variant takes its place on the device
    model, tokenizer = load_model(e.checkpoint, device, dtype)
    t0 = time.perf_counter()
    metrics = perplexity_and_agreement(model, batches, e.batch_size, reference, device, e.stride)
    return model, tokenizer, metrics | {"quality_seconds": seconds + time.perf_counter() - t0}


def run(cfg: DictConfig) -> dict:
    import torch

    from kvshare.data import load_tokens, strided_windows
    from kvshare.devices import resolve_device

    e = cfg.evaluate
    if e.variant not in VARIANTS:
        raise KVShareError(f"evaluate.variant={e.variant!r} is not known; use one of {', '.join(VARIANTS)}")
    spec = read_spec(e.checkpoint)
    plan = Plan.from_dict(spec["plan"])
    device = resolve_device(cfg.device)
    dtype = model_dtype(e.dtype, device)
    batches = strided_windows(load_tokens(e.data_dir, "val"), e.seq_len, e.max_windows, e.stride)
    tags = {"model": spec["model"], "method": spec["method"], "budget": spec["budget"], "variant": e.variant}
    with stage_run(cfg, "evaluate", tags) as mlrun:
        mlrun.set_tags({"kvshare.input_runs": ",".join(v for v in spec["runs"].values() if v)})
        t0 = time.perf_counter()
        try:
            model, tokenizer, metrics = quality(e, batches, device, dtype)
            t0_zeroshot = time.perf_counter()
            metrics |= zeroshot_metrics(model, tokenizer, e, device)
            if e.tasks:
                metrics["zeroshot_seconds"] = time.perf_counter() - t0_zeroshot
            measured = measured_cache_bytes_per_token(model, batches[0].to(device))
        except torch.OutOfMemoryError:  # e.g. when other jobs share the GPU
            raise KVShareError(
                f"CUDA ran out of memory at evaluate.batch_size={e.batch_size}, seq_len={e.seq_len}, "
                f"zeroshot_batch_size={e.zeroshot_batch_size}: lower them, or run fewer GPU jobs at once "
                "(snakemake --resources gpu=N)"
            ) from None
        dtype_bytes = next(model.parameters()).element_size()
        metrics |= {
            "kv_fraction": plan.kv_fraction,
            "kv_bytes_per_token": plan.kv_bytes_per_token(2),
            "deployable_kv_bytes_per_token": deployable_kv_bytes_per_token(plan, 2),
            "servable": float(Layout.of_plan(plan).form() is not None),
            "cache_bytes_per_token_measured": measured,
            "cache_bytes_per_token_analytic": plan.kv_bytes_per_token(dtype_bytes),
            "wse_total": plan.meta.get("wse_total"),
            "wall_seconds": time.perf_counter() - t0,
        }
        mlrun.log_metrics(metrics)
        summary = {
            "model": spec["model"],
            "method": spec["method"],
            "budget": spec["budget"],
            "variant": e.variant,
            "metrics": metrics,
            "runs": {**spec["runs"], "evaluate": mlrun.run_id},
        }
        atomic_write_json(e.out, summary)
        mlrun.log_artifact(e.out)
    return summary


main = entry("evaluate", run)

if __name__ == "__main__":
    main()
