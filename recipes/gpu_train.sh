#!/usr/bin/env bash
# Continue the default corrector's training on a lent GPU machine, in one call, from this repository's root.
#
#   bash recipes/gpu_train.sh --prepare        # here, once: the corpora's Debian packages -> .cache/gpu_train
#                                              # (the checkpoint comes from `bash bench/gpu_check.sh --prepare`)
#   bash recipes/gpu_train.sh                  # on the GPU machine ($OUT set; carry .cache/gpu_train and
#                                              # .cache/gpu_check): MINUTES of training, weights to $OUT
#   bash recipes/gpu_train.sh --unpack OUT DIR # here: the weights that came back -> a Hugging Face folder DIR
#
# The machine has no network and its own PyTorch and transformers (5.x, which loads a checkpoint in the
# dtype it was saved in: `recipes.train` trains in fp32 whatever it loads). The corpora are unpacked from
# their .debs; lmcor is imported through a folder of links to this tree. The run stops its training with
# SIGINT at TRAIN_S seconds (the checkpoint of the step reached is saved) and skips the scoring on dev,
# which the CPU does after: `python -m lmcor.recipes.train --init DIR ...` or export and calibrate DIR.
# Its weights come back in 15 MiB parts (a file from $OUT may hold 16 MiB) with train_log.jsonl, whose
# steps_per_s and data_share say whether the data or the model bounded the run. TRAIN_ARGS are more
# options of `recipes.train` (default: --join 0.5 --related 0.5, long inputs and recurring pieces: the model
# alone loses its place on them, and the shipped model's CPU run with them gained on every set; TRAIN_ARGS=
# for none).
set -u -o pipefail
here=$PWD  # --unpack's paths are the caller's
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CACHE=.cache/gpu_train
CHECKPOINT=.cache/gpu_check/hf
case "${1:-}" in
  --prepare)
    mkdir -p "$CACHE" && (cd "$CACHE" && apt-get download wordnet-base fortunes fortunes-min) || exit 1
    [ -f "$CHECKPOINT/config.json" ] || echo "no $CHECKPOINT yet: run bash bench/gpu_check.sh --prepare" >&2
    exit 0
    ;;
  --unpack)
    out=${2:?usage: bash recipes/gpu_train.sh --unpack OUT DIR} dir=${3:?usage: bash recipes/gpu_train.sh --unpack OUT DIR}
    case $out in /*) ;; *) out=$here/$out ;; esac
    case $dir in /*) ;; *) dir=$here/$dir ;; esac
    mkdir -p "$dir" && tar xf "$out/train.tar" -C "$dir" && cat $(ls "$out"/weights.part* | sort -V) > "$dir/model.safetensors" \
      && cp "$CHECKPOINT"/tokenizer* "$CHECKPOINT"/special_tokens_map.json "$dir"/ || exit 1
    echo "unpacked $dir (train_log.jsonl, state.json: the run's steps and losses)"
    exit 0
    ;;
  "") ;;
  *) echo "usage: bash recipes/gpu_train.sh [--prepare | --unpack OUT DIR]" >&2; exit 2 ;;
esac
: "${OUT:?set OUT to the folder whose files come back}"
export PYTHONUNBUFFERED=1
LOG=$OUT/train.log
{ nvidia-smi --query-gpu=name,memory.total --format=csv; nproc; } > "$LOG" 2>&1
corpora=$(mktemp -d)
for f in "$CACHE"/*.deb; do dpkg -x "$f" "$corpora"; done
mkdir -p /usr/share/games && cp -r "$corpora/usr/share/wordnet" /usr/share/ && cp -r "$corpora/usr/share/games/fortunes" /usr/share/games/ \
  || { echo "corpora not installed (run --prepare here, carry $CACHE)" | tee -a "$LOG"; exit 1; }
site=$(mktemp -d) && mkdir "$site/lmcor"
for f in lmcor/*; do ln -s "$PWD/$f" "$site/lmcor/"; done
for d in runtime export kernels bench recipes; do ln -s "$PWD/$d" "$site/lmcor/$d"; done
run=$(mktemp -d)
# -P: this tree's own lmcor/ folder first on sys.path would hide the links. The SIGINT at TRAIN_S ends the
# training (its exit status says so); what says it trained is its checkpoint. Its whole output goes to
# $OUT/train-output.log (the last 4 MiB: progress bars), its lines without progress to train.log.
PYTHONPATH=$site timeout -s INT -k 30 "${TRAIN_S:-330}" $PY -P -m lmcor.recipes.train --init "$CHECKPOINT" --out "$run" \
  --minutes "${MINUTES:-5}" --device "${DEVICE:-cuda}" ${TRAIN_ARGS---join 0.5 --related 0.5} > "$run/output" 2>&1
echo "training exit status: $?" >> "$LOG"
tail -c 4M "$run/output" > "$OUT/train-output.log"
tr '\r' '\n' < "$run/output" | grep -v -e '^\s*$' -e '%|' | tail -n 60 >> "$LOG"
[ -f "$run/checkpoint.pt" ] || { echo "FAILED: no checkpoint written (see train-output.log)" | tee -a "$LOG"; exit 1; }
PYTHONPATH=$site $PY -P - "$run" "$CHECKPOINT" "$OUT" >> "$LOG" 2>&1 <<'PY' \
  || { echo "FAILED: the weights could not be packed (see train.log)" | tee -a "$LOG"; exit 1; }
import json, sys, tarfile, torch
from pathlib import Path
from transformers import T5ForConditionalGeneration
run, init, out = map(Path, sys.argv[1:])
saved = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
model = T5ForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
model.load_state_dict(saved["model"])
model.save_pretrained(run / "hf-last")
(run / "hf-last" / "state.json").write_text(json.dumps(saved["state"], default=str))
data = (run / "hf-last" / "model.safetensors").read_bytes()
part = 15 * 2**20
for n in range(0, len(data), part):
    (out / f"weights.part{n // part}").write_bytes(data[n:n + part])
with tarfile.open(out / "train.tar", "w") as tar:
    for p in [*(run / "hf-last").iterdir(), run / "train_log.jsonl"]:
        if p.is_file() and p.name != "model.safetensors":
            tar.add(p, arcname=p.name)
print("packed", len(data), "bytes at step", saved["state"]["step"])
PY
tail -n 3 "$LOG"
