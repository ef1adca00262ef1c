#!/usr/bin/env bash
# Set up the three peer tools (onnxruntime-genai, optimum-onnx, llama-cpp-python) in their own
# virtual environments and build their model folders from the real sample.
#
#   bash tests/bench/setup_peers.sh            # PEERS_DIR defaults to ~/.cache/qwen-edge/peers
#
# Idempotent: a step whose stamp ($PEERS_DIR/.stamps/<step>) and product both exist is skipped. Every step logs
# (also to $PEERS_DIR/setup.log). A failing step appends its reason to $PEERS_DIR/<peer>.FAILED and
# the script moves on; steps that depend on it are skipped. A later run retries failed steps
# (every run deletes the old <peer>.FAILED files first and rewrites them from what fails this time).
#
# Result layout under $PEERS_DIR:
#   genai/ optimum/ llamacpp/              venvs (bin/python)
#   genai-int4/ genai-int8/                onnxruntime-genai model builder outputs (-e cpu, defaults)
#   optimum-fp32/                          optimum-onnx export (text-generation-with-past, fp32)
#   gguf/sample-mixed.gguf                 symlink to the sample GGUF
#   gguf/q8_0.gguf gguf/q4_0.gguf          requantized from the sample's dequantized weights (peer_llamacpp.py --make-gguf)
#   logs/<step>.log, setup.log, <venv>.freeze.txt, <peer>.FAILED
# Needs: python3 (3.11), cmake + a C/C++ compiler (llama-cpp-python builds from source, ~7 min on 2 cores).
set -u -o pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PEERS_DIR="${PEERS_DIR:-$HOME/.cache/qwen-edge/peers}"
HF_DIR="${HF_DIR:-$REPO/models/qwen2.5-coder-0.5b-instruct-hf}"
SAMPLE_GGUF="${SAMPLE_GGUF:-$REPO/models/qwen2.5-coder-0.5b-instruct.gguf}"
PY="${PYTHON:-python3}"
MODELS="$PEERS_DIR"   # model folders sit beside the venvs (tests/bench/peers.py expects $PEERS_DIR/genai-int4 ...)
STAMPS="$PEERS_DIR/.stamps"
LOG="$PEERS_DIR/setup.log"
mkdir -p "$PEERS_DIR" "$MODELS" "$STAMPS"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Everything reads local folders; make sure no library tries a model hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1

# Exact pins (versions measured to work together on this machine; see shared ANCHORS §8).
TORCH_PIN="torch==2.13.0"            # CPU wheel from local disk; install FIRST or pip pulls a CUDA build
ORT_PIN="onnxruntime==1.31.1"
ONNX_PIN="onnx==1.23.2"
GENAI_PKGS=("onnxruntime-genai==0.18.0" "$ORT_PIN" "$ONNX_PIN" "onnx-ir==1.1.0" "transformers==5.23.0"
            "numpy" "tokenizers" "safetensors")
OPTIMUM_PKGS=("optimum-onnx==0.1.0" "optimum==2.1.0" "transformers==4.57.6" "$ORT_PIN" "$ONNX_PIN"
              "numpy" "tokenizers" "safetensors")
LLAMACPP_PKGS=("llama-cpp-python==0.3.36" "gguf==0.19.0" "numpy" "tokenizers")

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$LOG" >&2; }
declare -A STATUS   # step -> "ok (Ns)" | "skipped (exists)" | "FAILED: why" | "not run: why"
ORDER=()

# run_step PEER STEP PRODUCT CMD...: runs CMD unless the step's stamp and its PRODUCT (a path) both exist;
# output goes to $PEERS_DIR/logs/STEP.log
run_step() {
  local peer="$1" step="$2" product="$3"; shift 3
  ORDER+=("$step")
  if [[ -e "$STAMPS/$step" && -e "$product" ]]; then
    STATUS[$step]="skipped (done before: $(cat "$STAMPS/$step"))"; log "SKIP $step (done before)"; return 0
  fi
  mkdir -p "$PEERS_DIR/logs"
  local out="$PEERS_DIR/logs/$step.log" t0=$SECONDS
  log "START $step (log: $out)"
  if ( "$@" ) >"$out" 2>&1; then
    local dt=$((SECONDS - t0)); echo "${dt}s on $(date -Is)" >"$STAMPS/$step"
    STATUS[$step]="ok (${dt}s)"; log "OK $step in ${dt}s"; return 0
  fi
  local dt=$((SECONDS - t0))
  local why; why="$(grep -vE "WARNING: Location 'file:///opt/.*' is ignored|^\s*$" "$out" | tail -n 3 | tr '\n' ' ' | cut -c1-400)"
  STATUS[$step]="FAILED after ${dt}s: $why"
  echo "$step: $why (full log: $out)" >>"$PEERS_DIR/$peer.FAILED"
  log "FAILED $step after ${dt}s: $why"; return 1
}
skip_step() {  # skip_step PEER STEP WHY
  ORDER+=("$2"); STATUS[$2]="not run: $3"; echo "$2: not run: $3" >>"$PEERS_DIR/$1.FAILED"; log "NOT RUN $2: $3"
}
pipq() {  # quiet pip install into venv $1, dropping the harmless find-links warnings
  local venv="$1"; shift
  "$PEERS_DIR/$venv/bin/python" -m pip install --quiet "$@" 2>&1 | grep -v "WARNING: Location 'file:///opt/.*' is ignored"
  return "${PIPESTATUS[0]}"
}
mkvenv() {  # mkvenv NAME: fresh venv (an incomplete one from an earlier failure is replaced)
  rm -rf "$PEERS_DIR/$1" && "$PY" -m venv "$PEERS_DIR/$1"
}
freeze() { "$PEERS_DIR/$1/bin/python" -m pip freeze 2>/dev/null >"$PEERS_DIR/$1.freeze.txt"; }

install_genai() {
  mkvenv genai && pipq genai "$TORCH_PIN" && pipq genai "${GENAI_PKGS[@]}" "$TORCH_PIN" &&
  "$PEERS_DIR/genai/bin/python" -c "import onnxruntime_genai, onnxruntime, onnx_ir, transformers, torch; print(onnxruntime_genai.__version__, onnxruntime.__version__, transformers.__version__, torch.__version__)" &&
  freeze genai
}
install_optimum() {
  mkvenv optimum && pipq optimum "$TORCH_PIN" && pipq optimum "${OPTIMUM_PKGS[@]}" "$TORCH_PIN" &&
  "$PEERS_DIR/optimum/bin/python" -c "import optimum.onnxruntime, onnxruntime, transformers, torch; from optimum.onnxruntime import ORTModelForCausalLM; print(onnxruntime.__version__, transformers.__version__, torch.__version__)" &&
  freeze optimum
}
install_llamacpp() {
  mkvenv llamacpp && pipq llamacpp --upgrade pip setuptools wheel &&
  pipq llamacpp --no-cache-dir "${LLAMACPP_PKGS[@]}" &&
  "$PEERS_DIR/llamacpp/bin/python" -c "import llama_cpp, gguf; print(llama_cpp.__version__)" &&
  freeze llamacpp
}
build_genai() {  # build_genai int4|int8
  local out="$MODELS/genai-$1" cache="$PEERS_DIR/tmp/genai-cache-$1"
  rm -rf "$out" "$cache" && mkdir -p "$cache" &&
  "$PEERS_DIR/genai/bin/python" -m onnxruntime_genai.models.builder -i "$HF_DIR" -o "$out" -p "$1" -e cpu -c "$cache" &&
  test -f "$out/model.onnx" -a -f "$out/genai_config.json" && rm -rf "$cache" && du -sb "$out"
}
export_optimum() {
  local out="$MODELS/optimum-fp32"
  rm -rf "$out" &&
  "$PEERS_DIR/optimum/bin/optimum-cli" export onnx --model "$HF_DIR" --task text-generation-with-past "$out" &&
  test -f "$out/model.onnx" && du -sb "$out"
}
link_sample_gguf() {
  mkdir -p "$MODELS/gguf" && test -f "$SAMPLE_GGUF" && ln -sfn "$(readlink -f "$SAMPLE_GGUF")" "$MODELS/gguf/sample-mixed.gguf"
}
make_gguf() {  # make_gguf q8_0|q4_0
  "$PEERS_DIR/llamacpp/bin/python" "$HERE/peer_llamacpp.py" --make-gguf "$1" --model "$SAMPLE_GGUF" \
      --out "$MODELS/gguf/$1.gguf"
}

T_ALL=$SECONDS
log "PEERS_DIR=$PEERS_DIR HF_DIR=$HF_DIR SAMPLE_GGUF=$SAMPLE_GGUF"
[[ -f "$HF_DIR/config.json" ]] || log "WARNING: $HF_DIR missing: model steps will fail"
rm -f "$PEERS_DIR"/{genai,optimum,llamacpp}.FAILED   # rewritten below by whatever fails this time

# --- onnxruntime-genai -----------------------------------------------------------------------
if run_step genai genai-venv "$PEERS_DIR/genai/bin/python" install_genai; then
  run_step genai genai-int4 "$MODELS/genai-int4/model.onnx" build_genai int4
  run_step genai genai-int8 "$MODELS/genai-int8/model.onnx" build_genai int8
else
  skip_step genai genai-int4 "genai venv failed"; skip_step genai genai-int8 "genai venv failed"
fi
# --- optimum-onnx ------------------------------------------------------------------------------
if run_step optimum optimum-venv "$PEERS_DIR/optimum/bin/python" install_optimum; then
  run_step optimum optimum-fp32 "$MODELS/optimum-fp32/model.onnx" export_optimum
else
  skip_step optimum optimum-fp32 "optimum venv failed"
fi
# --- llama-cpp-python ----------------------------------------------------------------------------
run_step llamacpp gguf-sample-mixed "$MODELS/gguf/sample-mixed.gguf" link_sample_gguf
if run_step llamacpp llamacpp-venv "$PEERS_DIR/llamacpp/bin/python" install_llamacpp; then
  run_step llamacpp gguf-q8_0 "$MODELS/gguf/q8_0.gguf" make_gguf q8_0
  run_step llamacpp gguf-q4_0 "$MODELS/gguf/q4_0.gguf" make_gguf q4_0
else
  skip_step llamacpp gguf-q8_0 "llamacpp venv failed"; skip_step llamacpp gguf-q4_0 "llamacpp venv failed"
fi
rm -rf "$PEERS_DIR/tmp"

# --- summary -------------------------------------------------------------------------------------
log "SUMMARY (total ${SECONDS}s this run; PEERS_DIR=$PEERS_DIR)"
nfail=0
for s in "${ORDER[@]}"; do
  log "  $(printf '%-18s' "$s") ${STATUS[$s]}"
  [[ "${STATUS[$s]}" == FAILED* || "${STATUS[$s]}" == "not run"* ]] && nfail=$((nfail + 1))
done
for m in genai-int4 genai-int8 optimum-fp32 gguf/sample-mixed.gguf gguf/q8_0.gguf gguf/q4_0.gguf; do
  if [[ -e "$MODELS/$m" ]]; then log "  model $(printf '%-22s' "$m") $(du -sbL "$MODELS/$m" | cut -f1) bytes"; fi
done
for p in genai optimum llamacpp; do
  [[ -s "$PEERS_DIR/$p.FAILED" ]] && log "  $p.FAILED: $(tr '\n' ' ' <"$PEERS_DIR/$p.FAILED" | cut -c1-300)"
done
log "$nfail step(s) failed or not run"
exit 0
