#!/usr/bin/env bash
# Set everything up, then run the main job on the bundled real example (../shared/data):
# train on six PBMC cell types, predict interferon-beta-stimulated CD14+ monocytes, compare
# with the baselines and write runs/kang18_holdout_celltype/report.html.
#
# Run it again and it says what it does with the earlier output: a finished run (one with
# metrics.csv) is moved aside to runs/kang18_holdout_celltype.<date>-<time> and the job runs
# afresh; an interrupted run (a checkpoint, no metrics.csv) is resumed where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
# numba (used by scanpy) starts one thread per core; this job needs none, and on a machine
# shared with other jobs they spin. perturbdiff sets torch's own threads (train.threads).
export NUMBA_NUM_THREADS="${NUMBA_NUM_THREADS:-1}"
bash scripts/setup.sh

config=examples/kang18_holdout_celltype.yaml
out=runs/kang18_holdout_celltype
resume=()
if [ -f "$out/metrics.csv" ]; then
    old="$out.$(date +%Y%m%d-%H%M%S)"
    n=1
    while [ -e "$old" ]; do old="$out.$(date +%Y%m%d-%H%M%S)-$n"; n=$((n + 1)); done
    mv "$out" "$old"
    echo "quickstart: $out held a finished run; moved it to $old and running the job afresh." >&2
elif [ -f "$out/checkpoints/last.pt" ]; then
    resume=(--resume)
    echo "quickstart: $out holds an interrupted run; resuming it." >&2
fi
.venv/bin/perturbdiff run "$config" --out "$out" "${resume[@]}"
