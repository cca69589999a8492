# Paths, the grid and the command line shared by every rule.
import sys
from pathlib import Path

STUDY = config["study"]
RESULTS = f"results/{STUDY}"
LOGS = f"logs/{STUDY}"
DATA = config["data"]
# Jobs run `python`: the interpreter running Snakemake, or a conda env's with --software-deployment-method conda.
os.environ.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
SRC = Path(workflow.basedir) / "src" / "kvshare"
MLFLOW_URI = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
VARIANTS = ["converted", "finetuned"] if config["finetune"] else ["converted"]
# A from-scratch study pretrains each layout; its `base` layout is the base model of every other stage.
PRETRAIN = config.get("pretrain")
GRID = [
    (model, method, f"{float(budget):g}")  # one spelling per budget: 0.5, 1
    for model in config["models"]
    for method, budgets in config["methods"].items()
    for budget in budgets
]
PARETO = [f"{RESULTS}/{name}" for name in ("pareto.csv", "pareto.md", "comparisons.md", "pareto_perplexity.png", "pareto_accuracy.png")]


wildcard_constraints:
    model="[A-Za-z0-9_.-]+",
    method="[a-z0-9+-]+",
    budget="[0-9.]+",
    variant="converted|finetuned",
    layout="[a-z0-9+]+",


def base_model(wildcards):
    """The model that search, convert and evaluate start from: prepared, or pretrained from scratch."""
    if PRETRAIN:
        return f"{RESULTS}/pretrained/{wildcards.model}/{PRETRAIN['base']}"
    return f"resources/models/{wildcards.model}"


def code(*modules):
    """The stage's own sources (every module of a package) and the config tree: editing them reruns the stage."""
    files = []
    for m in ("cli", "tracking", *modules):
        package = SRC / m
        files += sorted(str(p) for p in package.glob("*.py")) if package.is_dir() else [str(SRC / f"{m}.py")]
    return files + [str(Path(workflow.basedir) / "conf" / "config.yaml")]


def hydra(stage, run_name):
    """Common Hydra overrides: study, scale preset, run name, logs folder, and extra ones from ``--config hydra=``."""
    extra = config.get("hydra", {}).get(stage, "")
    return (
        f"study={STUDY} scale={config['scale']} name={run_name} "
        f"hydra.run.dir={LOGS}/hydra/{stage}/{run_name.replace(os.sep, '_')} {extra}"
    )
