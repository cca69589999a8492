#!/usr/bin/env bash
# Run a study with offline_study.sh in the background, so that it outlives the command that
# started it (a lent machine's calls are limited to minutes; a study takes longer):
#
#   workflow/scripts/study_bg.sh start BUNDLE CONFIGFILE SECONDS [snakemake args...]
#   workflow/scripts/study_bg.sh wait STUDY SECONDS OUT   # until it ends or SECONDS pass; then a snapshot in OUT
#   workflow/scripts/study_bg.sh stop STUDY OUT           # interrupt it (Snakemake stops its jobs), then a snapshot
#
# The run is its own session; its pid (the session id) and log sit beside the work folder
# ($KVSHARE_WORK or /tmp/kvshare-<study>): <work>.pid, <work>.log. `stop` interrupts the
# Snakemake of that session only (`pkill -f PATTERN` would also match the shell that asks,
# as it once did). Snapshots: study_snapshot.sh, plus the log.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
verb=${1:?start, wait or stop}
shift

launch='import os, signal, sys; os.setsid(); signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])'
study_of() { python3 -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['study'])" "$1"; }
progress() { echo "$1: $(grep -c '^Finished jobid' "$work.log" || true) jobs finished; $(tail -n 1 "$work.log")"; }
alive() { kill -0 "$(cat "$work.pid")" 2>/dev/null; }
snapshot() {
  "$here/study_snapshot.sh" "$study" "$1"
  cp "$work.log" "$1/$study.snakemake.log"
}

case $verb in
start)
  config=$2
  study=$(study_of "$here/../../$config")
  work=${KVSHARE_WORK:-/tmp/kvshare-$study}
  # A new session (outlives the caller), with SIGINT restored: a background job of a
  # non-interactive shell starts with it ignored, and then neither `timeout` nor `stop`
  # could interrupt Snakemake.
  python3 -c "$launch" "$here/offline_study.sh" "$@" >"$work.log" 2>&1 </dev/null &
  echo $! >"$work.pid"
  echo "started $study: pid $(cat "$work.pid"), log $work.log"
  ;;
wait)
  study=$1 seconds=$2 out=$3
  work=${KVSHARE_WORK:-/tmp/kvshare-$study}
  end=$((SECONDS + seconds))
  while alive && [ $SECONDS -lt $end ]; do sleep 5; done
  alive && state=running || state=ended
  progress "$study ($state)"
  snapshot "$out"
  ;;
stop)
  study=$1 out=$2
  work=${KVSHARE_WORK:-/tmp/kvshare-$study}
  # Snakemake of this run's session (its id is the pid) only: it stops its jobs and exits.
  pkill -INT -s "$(cat "$work.pid")" -x snakemake || true
  for _ in $(seq 120); do alive || break; sleep 1; done
  progress "$study (stopped)"
  snapshot "$out"
  ;;
*)
  echo "study_bg.sh: unknown verb '$verb': use start, wait or stop" >&2
  exit 2
  ;;
esac
