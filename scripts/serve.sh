#!/usr/bin/env bash
# Run the bot. Reads SLACK_*/ANTHROPIC_*/RUNPOD_* from the environment or ./.env.
# Default database: SQLite file ./tuner.db. Extra args go to `tuner serve` (e.g. --http).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" ""
exec .venv/bin/tuner serve "$@"
