#!/usr/bin/env bash
# Create ./.venv and install perturbdiff with its test and soma extras and the example plug-in.
# The soma extra (tiledbsoma, a 22 MB wheel, about 3 s to install here) lets the SOMA tests run.
#
# torch is installed first and pinned: an unpinned torch pulls gigabytes of CUDA wheels. Plain
# 'pip install torch==2.13.0' gets the CPU build where pip is set up to find one (this project's
# machines: a local wheel); elsewhere on Linux PyPI serves the CUDA build (about 2 GB more).
# PERTURBDIFF_TORCH replaces what is installed, word for word as pip arguments:
#   PERTURBDIFF_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" bash scripts/setup.sh
#   PERTURBDIFF_TORCH=/path/to/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl bash scripts/setup.sh
# A torch 2.13.0 already in .venv (a CUDA build installed by hand, say) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3.11 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
read -r -a torch_args <<< "${PERTURBDIFF_TORCH:-torch==2.13.0}"
echo "setup: installing ${torch_args[*]}" >&2
.venv/bin/python -m pip install --quiet "${torch_args[@]}"
.venv/bin/python -m pip install --quiet -e '.[test,soma]' -e examples/custom_kernel_plugin
