"""Stage ``pretrain``: a Llama-style model trained from scratch in any attention layout.

    python -m kvshare.pretrain model=tiny pretrain.layout=mqa+cla2 pretrain.out=results/pre/tiny/mqa+cla2 \
        pretrain.tokenizer=resources/models/tiny pretrain.data_dir=resources/data/tiny/pydoc

    torchrun --nproc_per_node=2 -m kvshare.pretrain ...   # the same on 2 GPUs (DDP; pretrain.parallel=fsdp: sharded)

The size comes from the model config (a ``source: random`` file such as
``conf/model/tiny.yaml``: hidden_size, layers, heads, ...); ``pretrain.layout``
sets the attention (:func:`kvshare.methods.parse_layout`): ``mha``, ``mqa``,
``gqa<k>`` (k KV heads per layer, contiguous query groups), each optionally
``+cla<k>`` (k adjacent layers share the first one's K/V), e.g. ``mqa+cla2``.
The model is a :class:`kvshare.modeling.KVShareLlamaForCausalLM` built from the
layout's plan.

Every layout trained with the same tokenizer, token files and seed sees the
same tokens in the same order (kvshare.training); the token files' hash is
recorded to show it. With no ``pretrain.tokenizer`` a byte-level BPE is trained
on the training documents only; with no ``pretrain.data_dir`` the corpus
(``data=``) is split and tokenized here as the tokenize stage would.

Output, in the format convert writes: MHA/GQA/MQA as a plain Llama, CLA layouts
as ``kvshare_llama`` with its remote code; always a ``kvshare_spec.json`` whose
plan is expressed against the MHA model of the same size (so evaluate reports
the KV fraction against it); the MHA model also gets ``kvshare_base.json``, as
prepare writes, for use as the base model of search and convert.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from omegaconf import DictConfig

from kvshare.checkpoint import BASE_RECORD, SPEC, spec_text
from kvshare.cli import entry
from kvshare.data import documents, is_heldout, load_tokens, tokenize_corpus
from kvshare.errors import KVShareError
from kvshare.methods import parse_layout
from kvshare.plan import ModelShape, Plan, cla_pattern
from kvshare.tracking import stage_run

SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")


def layout_plan(layout: str, layers: int, heads: int, head_dim: int) -> Plan:
    """The plan of ``layout`` against the MHA model of the same size."""
    parsed = parse_layout(layout)
    kv = heads if parsed.kv_heads is None else parsed.kv_heads
    if not 1 <= kv <= heads or heads % kv:
        raise KVShareError(f"pretrain.layout={layout!r}: {kv} KV heads must divide the {heads} query heads")
    shape = ModelShape(layers, heads, heads, head_dim)
    groups = tuple(h // (heads // kv) for h in range(heads))
    plan = Plan(shape, (groups,) * layers, tuple(range(layers)), parsed.name)
    return plan.with_cla(cla_pattern(layers, parsed.cla)) if parsed.cla > 1 else plan


def build_model(model_cfg, plan: Plan, tok):
    from kvshare.modeling import KVShareLlamaConfig, KVShareLlamaForCausalLM

    s = plan.shape
    config = KVShareLlamaConfig(
        vocab_size=len(tok),
        **{k: model_cfg[k] for k in SIZE_KEYS},
        head_dim=s.head_dim,
        num_key_value_heads=plan.n_kv(0),
        rope_theta=float(model_cfg.get("rope_theta", 10000.0)),
        q_to_kv=[plan.q_to_kv(i) for i in range(s.num_layers)],
        kv_layer=list(plan.kv_layer),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    return KVShareLlamaForCausalLM(config)


def tokens_and_tokenizer(cfg: DictConfig, work: Path, dist) -> tuple:
    """The tokenizer and the token folder; made once under ``work`` (rank 0) when the config names none."""
    from transformers import AutoTokenizer

    from kvshare.sources import train_tokenizer
    from kvshare.training import barrier

    p = cfg.pretrain
    tok_dir = Path(p.tokenizer) if p.tokenizer else work / "tokenizer"
    data_dir = Path(p.data_dir) if p.data_dir else work / "data"
    if dist.main and not (tok_dir / "tokenizer_config.json").exists():
        # Held-out documents stay out of the tokenizer too.
        train_docs = (d for d in documents(cfg.data) if not is_heldout(d, cfg.data.val_fraction))
        train_tokenizer(train_docs, cfg.model.vocab_size).save_pretrained(tok_dir)
    barrier(dist)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    if not p.data_dir and dist.main and not (data_dir / "train.bin").exists():
        tokenize_corpus(tok, documents(cfg.data), data_dir, cfg.data.val_fraction)
    barrier(dist)
    return tok, data_dir


def extra_files(plan: Plan, spec: dict, model_name: str, run_id: str, parameters: int) -> dict[str, str]:
    """The spec, whose plan is against the MHA model of the same size, and for the MHA model the record
    prepare writes for a base model."""
    extra = {SPEC: spec_text(spec)}
    if plan.stored_kv_heads == plan.shape.num_layers * plan.shape.num_heads:  # MHA: a base model
        record = {
            "model": model_name,
            "pretrain_run_id": run_id,
            "parameters": parameters,
            "layers": plan.shape.num_layers,
            "heads": plan.shape.num_heads,
            "kv_heads": plan.shape.num_heads,
            "head_dim": plan.shape.head_dim,
        }
        extra[BASE_RECORD] = json.dumps(record, indent=1) + "\n"
    return extra


def run(cfg: DictConfig) -> dict:
    import torch

    from kvshare import training
    from kvshare.checkpoint import save_model
    from kvshare.devices import resolve_device
    from kvshare.merge import plain_kv_heads, to_plain

    p, m = cfg.pretrain, cfg.model
    if m.source != "random" or any(k not in m for k in SIZE_KEYS):
        raise KVShareError(
            f"model={m.name} is not a size config: pretrain needs one with source: random and "
            f"{', '.join(SIZE_KEYS)} (e.g. model=tiny)"
        )
    head_dim = int(m.get("head_dim") or m.hidden_size // m.num_attention_heads)
    plan = layout_plan(p.layout, m.num_hidden_layers, m.num_attention_heads, head_dim)
    dist, device = training.setup_distributed(resolve_device(cfg.device))
    s = training.TrainSettings.of_stage("pretrain", p, device, cfg.seed)
    tok, data_dir = tokens_and_tokenizer(cfg, Path(s.resume_dir), dist)
    train_tokens, val = load_tokens(data_dir, "train"), load_tokens(data_dir, "val")
    digest = hashlib.sha256(Path(data_dir, "train.bin").read_bytes()).hexdigest()
    torch.manual_seed(cfg.seed)
    model = build_model(m, plan, tok)
    if int(train_tokens.max()) >= model.config.vocab_size:
        raise KVShareError(f"pretrain.data_dir={data_dir} holds token ids beyond the tokenizer's vocabulary")
    tags = {"model": m.name, "method": plan.method, "budget": plan.kv_fraction}
    with stage_run(cfg, "pretrain", tags, enabled=dist.main) as mlrun:
        t0 = time.perf_counter()
        inputs = {"layout": plan.method, "size": {k: m[k] for k in SIZE_KEYS}, "train_tokens_sha256": digest}
        result = training.train(model, train_tokens, val, s, device, dist, None, mlrun.log_metrics, inputs)
        model = training.trained_model(model, dist)
        if dist.main:
            mlrun.log_metrics(result.summary(time.perf_counter() - t0))
            model = model.eval()
            if plain_kv_heads(model.config.q_to_kv, model.config.kv_layer) is not None:
                model = to_plain(model)  # MHA, GQA, MQA: the plain Llama every engine loads
            spec = {
                "method": plan.method,
                "budget": plan.kv_fraction,
                "model": m.name,
                "source_model_dir": None,
                "export": model.config.model_type,
                "kv_fraction": plan.kv_fraction,
                "kv_bytes_per_token_16bit": plan.kv_bytes_per_token(2),
                "plan": plan.to_dict(),
                "runs": {"pretrain": mlrun.run_id},
                "pretrain_tokens": result.tokens,
                "train_tokens_sha256": digest,
            }
            parameters = sum(t.numel() for t in model.parameters())
            save_model(model, tok, p.out, extra_files(plan, spec, m.name, mlrun.run_id, parameters))
            training.clear_checkpoints(s.resume_dir)
    training.leave_distributed(dist)
    return {
        "heldout_loss_before": result.heldout_loss_before,
        "heldout_loss_after": result.heldout_loss_after,
        "kv_fraction": plan.kv_fraction,
        "train_tokens_sha256": digest,
    }


main = entry("pretrain", run)

if __name__ == "__main__":
    main()
