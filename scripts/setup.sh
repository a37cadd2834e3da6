#!/usr/bin/env bash
# Create ./.venv and install perturbdiff with its test extras and the example plug-in.
# torch is pinned first: an unpinned torch pulls gigabytes of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3.11 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e '.[test]' -e examples/custom_kernel_plugin
