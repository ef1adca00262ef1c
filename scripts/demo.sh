#!/usr/bin/env bash
# The main job on a fresh machine: get the real sample (Qwen2.5-Coder-0.5B-Instruct), export it at int4,
# and answer a question with it.
source "$(dirname "$0")/env.sh"
python models/get_sample.py 2>&1 | grep -v "^WARNING: Location" >&2
OUT=models/qwen2.5-coder-0.5b-instruct-int4
[ -f "$OUT/qwen-edge.json" ] || qwen-edge export models/qwen2.5-coder-0.5b-instruct-hf "$OUT" --bits 4
qwen-edge inspect "$OUT"
echo
qwen-edge generate "$OUT" "${1:-Write a Python function that reverses a string.}" --temperature 0 --max-new-tokens 200
