# Paths, the grid and the command line shared by every rule.
import shlex
import sys
from functools import cache
from pathlib import Path

from kvshare import deps, methods
from kvshare.errors import KVShareError

STUDY = config["study"]
RESULTS = f"results/{STUDY}"
LOGS = f"logs/{STUDY}"
DATA = config["data"]
SCALE = config["scale"]
GROUPS = {"scale": SCALE, "data": DATA}  # config groups the grid chooses for every stage that composes them
# Jobs run `python`: the interpreter running Snakemake, or a conda env's with --software-deployment-method conda.
os.environ.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
MLFLOW_URI = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
VARIANTS = ["converted", "finetuned"] if config["finetune"] else ["converted"]
# A from-scratch study pretrains each layout; its `base` layout is the base model of every other stage.
PRETRAIN = config.get("pretrain")
for name in config["methods"]:  # an unknown method stops the DAG before any job runs
    try:
        methods.parse_method(name)
    except KVShareError as e:
        raise ValueError(f"methods in the grid: {e}") from None
GRID = [
    (model, method, f"{float(budget):g}")  # one spelling per budget: 0.5, 1
    for model in config["models"]
    for method, budgets in config["methods"].items()
    for budget in budgets
]

# Every file read or written by a job, by pattern: the one place paths are spelt.
PATHS = {
    "model": "resources/models/{model}",
    "tokens": "resources/data/{model}/{data}",
    "eval_data": "resources/eval_data",
    "pretrained": f"{RESULTS}/pretrained/{{model}}/{{layout}}",
    "plan": f"{RESULTS}/plans/{{model}}/{{method}}/{{budget}}.json",
    "checkpoint": f"{RESULTS}/checkpoints/{{model}}/{{method}}/{{budget}}/{{variant}}",
    "gguf": f"{RESULTS}/gguf/{{model}}/{{method}}/{{budget}}/{{variant}}.{{gguf_type}}.gguf",
    "metrics": f"{RESULTS}/metrics/{{model}}/{{method}}/{{budget}}/{{variant}}.json",
    "metrics_pretrained": f"{RESULTS}/metrics/{{model}}/pretrained/{{layout}}.json",
    "log": f"{LOGS}/{{rule}}/{{name}}.log",
    "benchmark": f"{LOGS}/benchmarks/{{rule}}/{{name}}.tsv",
}
PARETO = [
    f"{RESULTS}/{name}"
    for name in ("pareto.csv", "pareto.md", "comparisons.md", "pareto_perplexity.png", "pareto_accuracy.png")
]



def path(key, **fixed):
    """PATHS[key] with some wildcards filled in (the others stay wildcards)."""
    return PATHS[key].format_map({**{w: f"{{{w}}}" for w in ("model", "data", "layout", "method", "budget",
                                                              "variant", "gguf_type", "rule", "name")}, **fixed})  # fmt: skip


def base_model(wildcards):
    """The model that search, convert and evaluate start from: prepared, or pretrained from scratch."""
    if PRETRAIN:
        return path("pretrained", model=wildcards.model, layout=PRETRAIN["base"])
    return path("model", model=wildcards.model)


def extra(stage):
    """Extra Hydra overrides for a stage, from the grid's `hydra:` section or `--config hydra=`."""
    return config.get("hydra", {}).get(stage, "")


def hydra(stage, run_name, *groups):
    """Common Hydra overrides: study, run name, logs folder, the grid's choice of each config group named
    (scale, data), and the extra ones."""
    chosen = " ".join(f"{group}={GROUPS[group]}" for group in groups)
    folder = f"{LOGS}/hydra/{stage}/{run_name.replace(os.sep, '_')}"
    return f"study={STUDY} name={run_name} hydra.run.dir={folder} {chosen} {extra(stage)}"


@cache
def _inputs(module, stage, overrides):
    return deps.source_files(module) + deps.conf_files(stage, list(overrides))


def code(module, stage, *overrides):
    """The stage's sources (its module and every kvshare module it imports) and the conf files its config
    composes under the job's overrides: editing any of them reruns the stage."""

    def files(wildcards):
        given = [o.format_map({"scale": SCALE, "data": DATA, **dict(wildcards.items())}) for o in overrides]
        return _inputs(module, stage, tuple(given + shlex.split(extra(stage))))

    return files
