#!/usr/bin/env bash
# The test command (README, .ci/run): set up .venv, fetch the real-model sample if it can be had
# (cached in ~/.cache/qwen-edge), run every test. Tests that need the sample skip, with the reason, without it.
source "$(dirname "$0")/env.sh"
python models/get_sample.py 2>&1 | grep -v "^WARNING: Location" >&2 \
    || echo "note: the real-model sample could not be fetched; its tests will be skipped" >&2
python -m pytest -rs -q "$@"
