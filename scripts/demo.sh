#!/usr/bin/env bash
# The main job on a fresh machine: get the real sample (Qwen2.5-Coder-0.5B-Instruct as one GGUF file),
# export it at int4 straight from the GGUF, and answer a question with it.
EXTRAS=export source "$(dirname "$0")/env.sh"
python models/get_sample.py --gguf-only 2>&1 | grep -v "^WARNING: Location" >&2
OUT=models/qwen2.5-coder-0.5b-instruct-int4
# (re-)export unless OUT is a folder this version can load
qwen-edge inspect "$OUT" >/dev/null 2>&1 || qwen-edge export models/qwen2.5-coder-0.5b-instruct.gguf "$OUT" --bits 4 --force
qwen-edge inspect "$OUT"
echo
qwen-edge generate "$OUT" "${1:-Write a Python function that reverses a string.}" --temperature 0 --max-new-tokens 200
