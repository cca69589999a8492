"""Tiny random Llama models built in code (no downloads), and stage configs in a temp folder."""

from __future__ import annotations

import torch
from hydra import compose, initialize_config_dir
from transformers import LlamaConfig, LlamaForCausalLM

from kvshare.cli import CONF_DIR


def tiny_llama(heads: int = 8, kv_heads: int = 4, layers: int = 4, seed: int = 0, vocab: int = 97) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=8 * heads,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=8,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def make_cfg(tmp_path, stage: str, *overrides: str):
    """The composed config of ``stage`` (conf/<stage>.yaml) with the MLflow store in ``tmp_path``."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            config_name=stage,
            overrides=[f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "study=test", *overrides],
        )


# Stages whose config composes a model config (conf/model/): overrides of model.* apply to them only.
WITH_MODEL = ("prepare", "tokenize", "search", "convert", "pretrain")


def pipeline_cfg(tmp_path, *model_overrides: str):
    """``cfg(stage, *overrides)`` for a pipeline of stages on one model: ``model_overrides`` go to the stages
    that compose the model config."""

    def cfg(stage: str, *overrides: str):
        return make_cfg(tmp_path, stage, *(model_overrides if stage in WITH_MODEL else ()), *overrides)

    return cfg
