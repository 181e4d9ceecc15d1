#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine (idempotent):
# a virtualenv in .venv with ddptrain and its test extra, and the Slurm/munge packages
# for the real one-node cluster tests. Services are started by the tests themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/slurm_install.sh
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 \
    -e '.[test]'
