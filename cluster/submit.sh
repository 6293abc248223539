#!/usr/bin/env bash
# Submit an alges command to a Ray cluster as a job.
#   cluster/submit.sh [--address http://HEAD:8265] [--no-wait] -- run --config configs/archive.yaml --out /mnt/shared/runs/a
# Everything after `--` is the `alges` command line. The working directory (this
# checkout, without .venv, runs and .git) is uploaded, so local config edits travel with
# the job. Paths for --pool/--out must be on storage every node mounts.
set -euo pipefail
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
wait_flag=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) address="$2"; shift 2 ;;
    --no-wait) wait_flag=(--no-wait); shift ;;
    --) shift; break ;;
    *) echo "usage: $0 [--address URL] [--no-wait] -- ALGES_ARGS..." >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "usage: $0 [--address URL] [--no-wait] -- ALGES_ARGS..." >&2; exit 2; }
cd "$(dirname "$0")/.."
runtime_env=$(cat <<JSON
{"excludes": [".venv", "runs", "*.pt", "*.parquet"],
 "env_vars": {"HF_HUB_OFFLINE": "${HF_HUB_OFFLINE:-0}", "PYTHONPATH": "."}}
JSON
)
exec ray job submit --address "$address" "${wait_flag[@]}" --working-dir . \
  --runtime-env-json "$runtime_env" -- python -m alges_dist.cli "$@"
