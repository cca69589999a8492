#!/usr/bin/env bash
# Publish a study run elsewhere (offline_study.sh or study_snapshot.sh wrote TARBALL) into results/<study>:
#
#   workflow/scripts/publish_study.sh TARBALL STUDY [SNAKEMAKE_LOG]
#
# Replaces results/<study>'s tables, plots, plans and metrics with the run's; writes its MLflow
# database as mlflow.db.gz with artifact locations made relative (`mlartifacts/...`, so the
# database can be browsed from the repository root once unpacked), mlartifacts.tar.gz, and
# logs.tar.gz (logs/<study> and, if given, the Snakemake log). results/<study>/README.md stays.
set -euo pipefail
tarball=$(realpath "$1") study=$2 smklog=${3:+$(realpath "$3")}
repo=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$tarball" -C "$tmp"
for need in "results/$study/pareto.csv" "results/$study/metrics" mlflow.db mlartifacts "logs/$study"; do
  [ -e "$tmp/$need" ] || { echo "publish_study.sh: $tarball has no $need: is '$study' its study?" >&2; exit 2; }
done
dest=$repo/results/$study
mkdir -p "$dest"
find "$dest" -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
(cd "$tmp/results/$study" && cp -r pareto.csv pareto.md comparisons.md ./*.png plans metrics "$dest/")
python3 - "$tmp/mlflow.db" <<'PY'
import re, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
relative = lambda uri: re.sub(r"^(file://)?/.*?/mlartifacts/", "mlartifacts/", uri)
for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
    key = "experiment_id" if table == "experiments" else "run_uuid"
    for k, uri in db.execute(f"select {key}, {column} from {table}").fetchall():
        db.execute(f"update {table} set {column} = ? where {key} = ?", (relative(uri), k))
db.commit()
PY
gzip -9 -n -c "$tmp/mlflow.db" > "$dest/mlflow.db.gz"
tar -C "$tmp" -czf "$dest/mlartifacts.tar.gz" mlartifacts
[ -z "$smklog" ] || cp "$smklog" "$tmp/logs/$study/snakemake.log"
tar -C "$tmp" -czf "$dest/logs.tar.gz" "logs/$study"
echo "published $study: $(find "$dest/metrics" -name '*.json' | wc -l) metrics files"
