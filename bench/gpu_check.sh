#!/usr/bin/env bash
# One prepared GPU check of lmcor, about 8 minutes at most on an H100/H200, from this repository's working tree.
#
#   bash bench/gpu_check.sh --prepare [CHECKPOINT] # here, on the CPU machine, once: the default corrector's
#                                                   # Hugging Face folder (rebuilt from the shipped bundle by
#                                                   # lmcor.recipes.from_bundle when none is given; ~3 minutes)
#                                                   # -> .cache/gpu_check/hf (bf16, ~11 MB)
#   bash bench/gpu_check.sh                         # on the GPU machine, in the repository root ($OUT set)
#   bash bench/gpu_check.sh --dry-run               # anywhere: print the stages, write a "not run" report
#   bash bench/gpu_check.sh --split WHEEL           # here: onnxruntime-gpu's wheel in 20 MiB parts .ortgpu1..
#
# On the GPU machine (device tool: the command runs in the repository root, $OUT comes back), carry
# .cache/gpu_check; onnxruntime-gpu comes from ../shared/gpu/README.md: its parts .ortgpu1.. (sent
# before, one per call) are assembled into .ortgpu-site, or an existing .ortgpu-site is used. It is
# put first on PYTHONPATH, never installed beside onnxruntime. Without it, the CUDA stages record
# "no CUDA" and the rest still runs. Results: $OUT/gpu_check.json, $OUT/gpu_check.txt, $OUT/gpu_check.log.
#
# Stages, each with its own timeout (seconds):
#   env 45 | bundles 40 (fp16/bf16 copies of the shipped fp32 default) | kernels 70 (Triton kernel
#   tests, TRITON_INTERPRET=0, fp16/bf16) | tokens 80 (CUDA vs CPU tokens, caches on the device and in host arrays) | encoder 80 (packed vs
#   padded, 64 requests, K=5, lengths 16-96) | latency 50 (batch 1 vs transformers bf16); each followed by
#   the report (10) and a kill 5 s after its limit; with the compiled core's build (60) and the
#   onnxruntime-gpu install (60). The whole check keeps to GPU_CHECK_BUDGET seconds (450): each stage's
#   limit is cut to what is left, and a stage with no time left is recorded as not run. Exit status 1
#   where a stage or a measurement failed, was cut short or left no result.
#   Without onnxruntime-gpu, the packed encoder and transformers still run (they need PyTorch's CUDA only).
set -u
here=$PWD
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  --prepare)
    src=${2:-} rebuilt=
    if [ -z "$src" ]; then  # the shipped default's checkpoint, rebuilt from its bundle and checked against it
      rebuilt=$(mktemp -d) src=$rebuilt/hf
      $PY -m lmcor.recipes.from_bundle "$src" || { rm -rf "$rebuilt"; exit 1; }
    fi
    mkdir -p .cache/gpu_check/hf
    $PY - "$src" .cache/gpu_check/hf <<'PY'
import sys, torch
from transformers import AutoTokenizer, T5ForConditionalGeneration
src, out = sys.argv[1:]
T5ForConditionalGeneration.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(out)
AutoTokenizer.from_pretrained(src).save_pretrained(out)
print("prepared", out, "(carry .cache/gpu_check on the GPU machine)")
PY
    rc=$?
    [ -n "$rebuilt" ] && rm -rf "$rebuilt"
    exit $rc
    ;;
  --split)
    # onnxruntime-gpu's wheel (pip download --no-deps onnxruntime-gpu==1.31.1 --python-version 3.12 ...)
    # in parts that fit one transfer beside the working tree (~42 MiB of a call's 64): .ortgpu1..N,
    # one per call, with the wheel's name and sha256 in .ortgpu1.
    whl=$(cd "$here" && realpath "${2:?usage: bash bench/gpu_check.sh --split ONNXRUNTIME_GPU_WHEEL}") || exit 2
    parts=$(mktemp -d)
    rm -rf .ortgpu[0-9]* && split -b 20m -d -a 3 "$whl" "$parts/part" || exit 1
    i=0
    for p in "$parts"/part*; do
      i=$((i+1)); mkdir -p ".ortgpu$i"; mv "$p" ".ortgpu$i/"
      grep -qx "/.ortgpu$i/" .git/info/exclude 2>/dev/null || echo "/.ortgpu$i/" >> .git/info/exclude
    done
    basename "$whl" > .ortgpu1/WHEEL_NAME && sha256sum "$whl" | cut -d' ' -f1 > .ortgpu1/WHEEL_SHA256
    rm -rf "$parts"
    echo "$i parts of at most 20 MiB: .ortgpu1 .. .ortgpu$i (send one per call, back to back)"
    exit 0
    ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run | --prepare [CHECKPOINT] | --split WHEEL]" >&2; exit 2 ;;
esac
OUT=${OUT:-$PWD/.cache/gpu_check/out}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT  # its bundles too, however the check ends
CHECKPOINT=.cache/gpu_check/hf
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: > "$LOG"
STAGES=(env:45 bundles:40 kernels:70 tokens:80 encoder:80 latency:50)
BUDGET=${GPU_CHECK_BUDGET:-450}  # seconds for the whole check (bash's SECONDS counts from its start)

say() { echo "$*" | tee -a "$LOG"; }

if [ "$DRY" = 1 ]; then
  say "gpu_check dry run: stages (timeout s): ${STAGES[*]}"
  for s in "${STAGES[@]}"; do say "  ${s%%:*}: timeout ${s##*:} s"; done
  $PY bench/gpu_check.py report --work "$WORK" --out "$OUT" --dry-run >>"$LOG" 2>&1 || exit 1
  say "report: $OUT/gpu_check.json, $OUT/gpu_check.txt"
  exit 0
fi

# The compiled core does not travel (built files are ignored): built here, in place, or the Python
# references run and the host-side numbers come out slower than lmcor's.
if ! ls lmcor/_core*.so >/dev/null 2>&1; then
  timeout 60 $PY setup.py -q build_ext --inplace >>"$LOG" 2>&1 || say "compiled core not built (see log): references run"
fi
# lmcor importable without an install: a package folder of links to the tree (runtime/ -> lmcor.runtime, ...)
if ! $PY -c "import lmcor.runtime" 2>/dev/null; then
  shim=$WORK/site/lmcor
  mkdir -p "$shim"
  for f in lmcor/*; do ln -s "$PWD/$f" "$shim/"; done
  for d in runtime export kernels bench recipes; do ln -s "$PWD/$d" "$shim/$d"; done
  export PYTHONPATH=$WORK/site:${PYTHONPATH:-}
fi
# onnxruntime-gpu, per ../shared/gpu/README.md: its parts in numeric order (.ortgpu2 before .ortgpu10),
# checked against WHEEL_SHA256 where the parts carry one, installed into a temporary folder that
# becomes .ortgpu-site only once pip succeeded (a half install is never reused); no network.
if [ ! -d .ortgpu-site ] && [ -f .ortgpu1/WHEEL_NAME ]; then
  say "assembling onnxruntime-gpu from .ortgpu1.."
  w=$WORK/$(cat .ortgpu1/WHEEL_NAME)
  for d in $(ls -d .ortgpu[0-9]* | sort -V); do cat "$d"/part*; done > "$w"
  if [ -f .ortgpu1/WHEEL_SHA256 ] && [ "$(sha256sum "$w" | cut -d' ' -f1)" != "$(cat .ortgpu1/WHEEL_SHA256)" ]; then
    say "onnxruntime-gpu: the assembled wheel's sha256 differs from WHEEL_SHA256 (a part missing or damaged): not installed"
  elif timeout 60 $PY -m pip install -q --no-deps --no-index --no-compile --disable-pip-version-check \
      --target "$WORK/ortgpu-site" "$w" >>"$LOG" 2>&1; then
    mv "$WORK/ortgpu-site" .ortgpu-site
  else
    say "onnxruntime-gpu: pip failed (see above); the CUDA stages of ONNX Runtime will say no CUDA"
  fi
  rm -f "$w"
fi
[ -d .ortgpu-site ] && export PYTHONPATH=$PWD/.ortgpu-site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0  # every stage compiles its kernels for the GPU, whatever the caller's environment says

for s in "${STAGES[@]}"; do
  name=${s%%:*} limit=${s##*:}
  # kept back: the kill's grace (5), the report after the stage (10) and the last one (10); for the
  # kernels, the reading of pytest's report (30)
  reserve=25; [ "$name" = kernels ] && reserve=55
  left=$((BUDGET - SECONDS - reserve))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    say "== $name: not run (the check's ${BUDGET} s are spent)"
    echo budget > "$WORK/$name.status"
    continue
  fi
  say "== $name (timeout $limit s)"
  if [ "$name" = kernels ]; then
    # -P (Python 3.11+; the GPU machine's is 3.12): the repository root first on sys.path would hide the
    # lmcor shim behind the tree's own lmcor/
    timeout -k 5 "$limit" $PY -P -m pytest tests/test_kernels.py -q -k gpu -p no:cacheprovider -rs \
      --junitxml="$WORK/kernels.xml" >>"$LOG" 2>&1
    echo $? > "$WORK/kernels.pytest"
    timeout 30 $PY bench/gpu_check.py kernels --work "$WORK" >>"$LOG" 2>&1
  else
    timeout -k 5 "$limit" $PY bench/gpu_check.py "$name" --work "$WORK" --checkpoint "$CHECKPOINT" >>"$LOG" 2>&1
  fi
  echo $? > "$WORK/$name.status"
  # After every stage: a run cut short by the command's limit still brings back what it measured.
  timeout 10 $PY bench/gpu_check.py report --work "$WORK" --out "$OUT" >>"$LOG" 2>&1
done
timeout 10 $PY bench/gpu_check.py report --work "$WORK" --out "$OUT" --strict >>"$LOG" 2>&1
rc=$?
cat "$OUT/gpu_check.txt"
tail -n 1 "$LOG"
exit $rc
