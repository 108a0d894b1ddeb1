#!/usr/bin/env bash
# Train the embedded model with variety on the GPU machine, one call of the device tool per part
# (carry .train_data, made on the CPU machine by train/build_corpus.py and train/prepare_data.py).
# Each part runs under its own time limit; results come back under $OUT.
#
#   bash train/gpu_train.sh train     # the schedule below, from scratch ($OUT/model: bf16 shards of at most 16 MiB)
#   bash train/gpu_train.sh resume    # continue from .train_ckpt, left by a stopped run (the machine must still be warm)
#   bash train/gpu_train.sh eval      # dense accuracy of $OUT/model on the eval and held-out varieties at 4K
#
# PHASES, SHAPE, TRAIN_S (the command's limit; training saves .train_ckpt and stops STOP_S seconds
# in if the schedule has not ended) and EVAL_S override the defaults below.
set -uo pipefail
OUT=${OUT:-train/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
case "${1:-train}" in
  train|resume)
    resume=()
    [ "${1:-train}" = resume ] && resume=(--resume .train_ckpt)
    timeout "${TRAIN_S:-590}" python3 train/train_model.py --data .train_data --out "$OUT" --variety --workers 14 \
      --phases "${PHASES:-2048:200,8192:160,16384:100,32768:60}" \
      --shape "${SHAPE:-hidden_size=384,intermediate_size=1024,num_attention_heads=6,max_position_embeddings=65536,rope_theta=2000000}" \
      --stop-after "${STOP_S:-560}" --checkpoint .train_ckpt "${resume[@]}" > "$OUT/train.log" 2>&1
    echo "train exit $?"; tail -n 3 "$OUT/train.log" | cut -c1-300 ;;
  eval)
    for v in eval heldout; do
      OUT="$OUT/$v" timeout "${EVAL_S:-280}" python3 train/evaluate.py --model "$OUT/model" --data .train_data \
        --lengths 4096 --n 10 --n-single 10 --variety "$v" --skip-bpb > "$OUT/eval_$v.log" 2>&1
      echo "eval $v exit $?"; grep accuracy "$OUT/eval_$v.log"
    done ;;
  *) echo "usage: bash train/gpu_train.sh train|resume|eval" >&2; exit 2 ;;
esac
