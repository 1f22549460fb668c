#!/usr/bin/env bash
# One prepared GPU check of lmcor, under 8 minutes on an H100/H200, from this repository's working tree.
#
#   bash bench/gpu_check.sh --prepare CHECKPOINT   # here, on the CPU machine, once: the default corrector's
#                                                   # Hugging Face folder -> .cache/gpu_check/hf (bf16, ~11 MB)
#   bash bench/gpu_check.sh                         # on the GPU machine, in the repository root ($OUT set)
#   bash bench/gpu_check.sh --dry-run               # anywhere: print the stages, write a "not run" report
#
# On the GPU machine (device tool: the command runs in the repository root, $OUT comes back), carry
# .cache/gpu_check; onnxruntime-gpu comes from ../shared/gpu/README.md: its parts .ortgpu1.. (sent
# before, one per call) are assembled into .ortgpu-site, or an existing .ortgpu-site is used. It is
# put first on PYTHONPATH, never installed beside onnxruntime. Without it, the CUDA stages record
# "no CUDA" and the rest still runs. Results: $OUT/gpu_check.json, $OUT/gpu_check.txt, $OUT/gpu_check.log.
#
# Stages, each with its own timeout (seconds):
#   env 30 | bundles 60 (fp16/bf16 copies of the shipped fp32 default) | kernels 100 (Triton kernel
#   tests, TRITON_INTERPRET=0, fp16/bf16) | tokens 100 (CUDA vs CPU tokens, caches on the device and in host arrays) | encoder 60 (packed vs
#   padded, 64 requests, K=5, lengths 16-96) | latency 70 (batch 1 vs transformers bf16); with the
#   onnxruntime-gpu install (60), at most 480 s in all.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  --prepare)
    src=${2:?usage: bash bench/gpu_check.sh --prepare HF_CHECKPOINT_FOLDER}
    mkdir -p .cache/gpu_check/hf
    exec $PY - "$src" .cache/gpu_check/hf <<'PY'
import sys, torch
from transformers import AutoTokenizer, T5ForConditionalGeneration
src, out = sys.argv[1:]
T5ForConditionalGeneration.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(out)
AutoTokenizer.from_pretrained(src).save_pretrained(out)
print("prepared", out, "(carry .cache/gpu_check on the GPU machine)")
PY
    ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run | --prepare CHECKPOINT]" >&2; exit 2 ;;
esac
OUT=${OUT:-$PWD/.cache/gpu_check/out}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
CHECKPOINT=.cache/gpu_check/hf
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: > "$LOG"
STAGES=(env:30 bundles:60 kernels:100 tokens:100 encoder:60 latency:70)

say() { echo "$*" | tee -a "$LOG"; }

if [ "$DRY" = 1 ]; then
  say "gpu_check dry run: stages (timeout s): ${STAGES[*]}"
  for s in "${STAGES[@]}"; do say "  ${s%%:*}: timeout ${s##*:} s"; done
  $PY bench/gpu_check.py report --work "$WORK" --out "$OUT" --dry-run >>"$LOG" 2>&1 || exit 1
  say "report: $OUT/gpu_check.json, $OUT/gpu_check.txt"
  exit 0
fi

# lmcor importable without an install: a package folder of links to the tree (runtime/ -> lmcor.runtime, ...)
if ! $PY -c "import lmcor.runtime" 2>/dev/null; then
  shim=$WORK/site/lmcor
  mkdir -p "$shim"
  for f in lmcor/*; do ln -s "$PWD/$f" "$shim/"; done
  for d in runtime export kernels bench recipes; do ln -s "$PWD/$d" "$shim/$d"; done
  export PYTHONPATH=$WORK/site:${PYTHONPATH:-}
fi
# onnxruntime-gpu, per ../shared/gpu/README.md
if [ ! -d .ortgpu-site ] && [ -f .ortgpu1/WHEEL_NAME ]; then
  say "assembling onnxruntime-gpu from .ortgpu1.."
  w=$(cat .ortgpu1/WHEEL_NAME) && cat .ortgpu[0-9]*/part* > "$w" &&
    timeout 60 $PY -m pip install -q --no-deps --target .ortgpu-site "$w" >>"$LOG" 2>&1; rm -f "$w"
fi
[ -d .ortgpu-site ] && export PYTHONPATH=$PWD/.ortgpu-site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1

for s in "${STAGES[@]}"; do
  name=${s%%:*} limit=${s##*:}
  say "== $name (timeout $limit s)"
  if [ "$name" = kernels ]; then
    TRITON_INTERPRET=0 timeout -k 5 "$limit" $PY -m pytest tests/test_kernels.py -q -k gpu -p no:cacheprovider -rs \
      --junitxml="$WORK/kernels.xml" >>"$LOG" 2>&1
    echo $? > "$WORK/kernels.pytest"
    timeout 30 $PY bench/gpu_check.py kernels --work "$WORK" >>"$LOG" 2>&1
  else
    timeout -k 5 "$limit" $PY bench/gpu_check.py "$name" --work "$WORK" --checkpoint "$CHECKPOINT" >>"$LOG" 2>&1
  fi
  echo $? > "$WORK/$name.status"
done
$PY bench/gpu_check.py report --work "$WORK" --out "$OUT" >>"$LOG" 2>&1
cat "$OUT/gpu_check.txt"
