"""kvshare workflow: prepare → (pretrain) → search → convert → finetune → evaluate → pareto.

    snakemake --profile workflow/profiles/smoke      # whole DAG on CPU, tiny budgets
    snakemake --profile workflow/profiles/gpu        # real sizes, GPU jobs declare gpu=1
    snakemake -n                                     # show what would run

The grid (models, methods, budgets) is the Snakemake config
(workflow/config/*.yaml, schema in workflow/schemas/); every other setting is a
Hydra default in conf/, overridable per stage with ``--config hydra='...'``.
"""

import os
import shlex
import sys
import time
import uuid
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

# This workflow's own sources, for the Snakefile and for every job it starts.
SOURCES = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SOURCES)
# Snakemake's own prefix (bash's strict mode) kept, this checkout's sources first on the path of every job.
shell.prefix(f"set -euo pipefail; export PYTHONPATH={shlex.quote(SOURCES)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")


# The smoke grid unless a grid is given (--configfile, or a profile's configfile): Snakemake merges
# config files key by key, so a default read as well would leak its methods into another grid.
if not workflow.overwrite_configfiles:

    configfile: "workflow/config/smoke.yaml"


# --config passes text: `finetune=false` arrives as "false".
for switch in ("finetune", "partial"):
    if str(config.get(switch)).lower() in ("true", "false"):
        config[switch] = str(config[switch]).lower() == "true"
validate(config, "workflow/schemas/config.schema.yaml")

# One id per `snakemake` call, inherited by every job: MLflow groups an invocation's runs by it.
os.environ.setdefault("KVSHARE_INVOCATION", time.strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6])


include: "workflow/rules/common.smk"


wildcard_constraints:
    model="[A-Za-z0-9_.-]+",
    method=methods.METHOD_PATTERN,
    budget="[0-9.]+",
    variant="converted|finetuned",
    layout=methods.LAYOUT_PATTERN,
    gguf_type="f32|f16|bf16|q8_0",


include: "workflow/rules/prepare.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/search.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/pareto.smk"
include: "workflow/rules/export.smk"


onstart:
    # Create the MLflow store and experiment before jobs start in parallel.
    from kvshare.tracking import init_store

    init_store(MLFLOW_URI, STUDY)


rule all:
    default_target: True
    input:
        PARETO,
