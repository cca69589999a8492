"""Stage ``export``: a converted or fine-tuned checkpoint → one GGUF file that llama.cpp serves.

    python -m kvshare.export export.checkpoint=results/smoke/checkpoints/smollm2-135m/mqa/0.34/converted \
        export.type=q8_0 export.out=results/smoke/gguf/smollm2-135m/mqa/0.34/converted.q8_0.gguf

``export.type``: f32, f16, bf16 or q8_0 (matrices; norms stay float32). What is
written depends on the plan's layout (:mod:`kvshare.serving`):

- equal groups, one KV-head count in every layer (GQA, MQA): the standard
  ``llama`` GGUF;
- equal groups with per-layer counts (QCQA-EC, GQA with uneven counts): the
  ``deci`` GGUF, llama.cpp's Llama graph with a per-layer ``head_count_kv``;
- unequal groups: refused with one line naming the nearest servable form, which
  ``export.pad=true`` writes (KV heads repeated into equal groups: the same
  function, the deployable KV bytes);
- CLA: refused with one line (no engine serves cross-layer sharing).

Bad input ends with one line and exit status 2 and writes nothing; the file is
written to a temporary name and renamed. The MLflow run is tagged with the
checkpoint's convert / finetune run ids and logs nominal and served KV bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from kvshare.checkpoint import read_config, read_spec
from kvshare.cli import entry
from kvshare.errors import KVShareError
from kvshare.io import atomic_path
from kvshare.serving import Layout, why_not_servable
from kvshare.tracking import stage_run

TYPES = ("f32", "f16", "bf16", "q8_0")


def check(e: DictConfig) -> tuple[dict, dict, Layout]:
    """The checkpoint's spec, config and layout, or a one-line error for anything the export cannot serve."""
    if e.type not in TYPES:
        raise KVShareError(f"export.type={e.type!r} is not known; use one of {', '.join(TYPES)}")
    if not str(e.out).endswith(".gguf"):
        raise KVShareError(f"export.out={e.out} must name a .gguf file")
    config = read_config(e.checkpoint)
    spec = read_spec(e.checkpoint)
    from kvshare.ggufio import check_exportable

    check_exportable(config, e.checkpoint)
    layout = Layout.of_config(config)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if layout.form() is None and (layout.cla_layers() or not e.pad):
        raise KVShareError(
            f"{e.checkpoint} ({spec.get('method')}) is not exported: {why_not_servable(layout, head_dim)}"
        )
    return spec, config, layout


def run(cfg: DictConfig) -> dict:
    from kvshare.ggufio import write_gguf

    e = cfg.export
    spec, config, layout = check(e)
    runs = spec.get("runs", {})
    source = runs.get("finetune") or runs.get("pretrain") or runs.get("convert") or ""
    tags = {"model": spec.get("model"), "method": spec.get("method"), "budget": spec.get("budget"),
            "variant": e.variant}  # fmt: skip
    pre = e.tokenizer_pre or e.gguf_pre.get(str(spec.get("model")), "default")
    with stage_run(cfg, "export", tags) as mlrun:
        mlrun.set_tags({"kvshare.input_runs": source, "kvshare.gguf_type": e.type})
        meta = {"name": f"{spec.get('model')} {spec.get('method')} {spec.get('budget')} {e.variant}",
                "method": str(spec.get("method")), "budget": str(spec.get("budget")), "input_run": source}  # fmt: skip
        with atomic_path(e.out) as tmp:
            written = write_gguf(tmp, e.checkpoint, config, layout, e.type, e.pad, pre, meta)
            os.chmod(tmp, 0o644)  # a model file others may serve (the temporary name is private)
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        stored = sum(layout.kv_heads(i) for i in range(len(layout.maps)) if layout.kv_layer[i] == i)
        result = {
            **written,
            "type": e.type,
            "padded": layout.form() is None,
            "kv_bytes_per_token": 4 * head_dim * stored,
            "served_kv_bytes_per_token": 4 * head_dim * sum(written["kv_heads"]),
            "file_bytes": Path(e.out).stat().st_size,
            "runs": {**runs, "export": mlrun.run_id},
        }
        mlrun.set_tags({"kvshare.gguf_arch": written["arch"]})
        mlrun.log_metrics({k: result[k] for k in ("kv_bytes_per_token", "served_kv_bytes_per_token", "file_bytes")})
    return result


main = entry("export", run)

if __name__ == "__main__":
    main()
