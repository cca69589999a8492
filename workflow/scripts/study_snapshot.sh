#!/usr/bin/env bash
# Pack what a study run by offline_study.sh has produced, also while it is still running
# (offline_study.sh packs its result this way when it ends):
#
#   workflow/scripts/study_snapshot.sh STUDY OUT
#
# OUT/<study>.tar.gz gets results/<study> (without weights),
# logs/<study>, mlflow.db, mlartifacts), with the database copied through SQLite's backup API
# so a write in flight cannot leave a torn copy. Work folder: $KVSHARE_WORK or /tmp/kvshare-<study>.
set -euo pipefail
study=$1 out=$(realpath "$2")
cd "${KVSHARE_WORK:-/tmp/kvshare-$study}"
snap=$(mktemp -d)
python3 -c "import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))" mlflow.db "$snap/mlflow.db"
have=()  # what exists so far (an early stop may precede results/ or the artifacts)
for p in "results/$study" "logs/$study" mlartifacts; do [ ! -e "$p" ] || have+=("$p"); done
# A running study's logs grow while tar reads them: tar's status 1 ("file changed") is expected.
tar --warning=no-file-changed --exclude="results/$study/checkpoints" --exclude="results/$study/pretrained" \
  --exclude="*.safetensors" -czf "$out/$study.tar.gz.tmp" "${have[@]}" -C "$snap" mlflow.db || [ $? -eq 1 ]
mv "$out/$study.tar.gz.tmp" "$out/$study.tar.gz"
rm -rf "$snap"
