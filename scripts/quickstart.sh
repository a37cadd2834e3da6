#!/usr/bin/env bash
# Set everything up, then run the main job on the bundled real example (../shared/data):
# train on six PBMC cell types, predict interferon-beta-stimulated CD14+ monocytes, compare
# with the baselines and write runs/kang18_holdout_celltype/report.html.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/perturbdiff run examples/kang18_holdout_celltype.yaml
