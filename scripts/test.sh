#!/usr/bin/env bash
# Run the test suite (CPU only; every external service is a loopback fake).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" "train,test"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
