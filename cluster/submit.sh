#!/usr/bin/env bash
# Submit an alges command to a Ray cluster as a job.
#   cluster/submit.sh [--address http://HEAD:8265] [--no-wait] -- run --config configs/archive.yaml --out /mnt/shared/runs/a
# Everything after `--` is the `alges` command line. Only an allow-list of this checkout is
# uploaded (the package, configs/, pyproject.toml, README.md): never .env files, keys,
# credentials, data or run folders that happen to sit in the working tree. Paths for
# --pool/--out must be on storage every node mounts.
#
# Token auth: the cluster requires Ray's token; the client reads it from RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (RAY_AUTH_MODE=token is set here).
#
# Exit status: that of the job's `alges` command where Ray reports it: 0 done, 3 stopped for
# people's labels (`alges label`, then submit the same command again), 1 anything else.
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
repo="$(cd "$(dirname "$0")/.." && pwd)"
stage="$(mktemp -d "${TMPDIR:-/tmp}/alges-submit.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
# the allow-list: source files of the package and the configs, nothing else
(cd "$repo" && find alges_dist configs -type f \( -name '*.py' -o -name '*.yaml' -o -name '*.yml' -o -name '*.json' \) \
    -not -path '*/__pycache__/*' -print0 | xargs -0 -r cp --parents -t "$stage")
cp "$repo/pyproject.toml" "$repo/README.md" "$stage/"
runtime_env=$(cat <<JSON
{"env_vars": {"HF_HUB_OFFLINE": "${HF_HUB_OFFLINE:-0}", "PYTHONPATH": "."}}
JSON
)
export RAY_AUTH_MODE=token
output="$(mktemp "${TMPDIR:-/tmp}/alges-submit-log.XXXXXX")"
trap 'rm -rf "$stage" "$output"' EXIT
cd "$stage"
# not exec: the EXIT trap removes the staging folder afterwards
set +e
ray job submit --address "$address" "${wait_flag[@]}" --working-dir . \
  --runtime-env-json "$runtime_env" -- python -m alges_dist.cli "$@" 2>&1 | tee "$output"
status=${PIPESTATUS[0]}
set -e
# `ray job submit` exits 1 for every failed job; a run waiting for labels is not a failure
if [[ $status -ne 0 ]] && grep -q "failed with exit code 3[,.]" "$output"; then
  exit 3
fi
exit "$status"
