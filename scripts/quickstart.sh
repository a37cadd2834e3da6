#!/usr/bin/env bash
# Set everything up, then run the main job on the bundled real example (../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
data="${PERTURBDIFF_DATA:-../shared/data}"
.venv/bin/perturbdiff etest "$data/norman19_mcfaline23.h5ad" \
    --perturbation-key perturbation --control control --group-by cell_type \
    --kernel energy --permutations 200 --out runs/etest_norman19.csv
