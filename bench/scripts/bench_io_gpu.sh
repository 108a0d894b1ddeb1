#!/usr/bin/env bash
# bench-io on the GPU machine (the device tool, one H200): absolute decode timings per tier, with
# the host tier read zero-copy.  One call does every variant; it stops starting examples after
# --max-minutes so that it ends within the tool's 10-minute limit.
#
#   bash bench/scripts/bench_io_gpu.sh [bench-io options]        (carry .whl: see ../shared/gpu/README.md)
#
# Writes $OUT/bench-io-gpu/{report.json,report.md,*.png} and $OUT/log.
set -euo pipefail
OUT=${OUT:-bench/out}
mkdir -p "$OUT" /tmp/pkg
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
ln -sfn "$PWD" /tmp/pkg/rcengine   # the repository root is the package
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m rcengine.cli.app bench-io --lengths 4096,16384 --examples 1 --max-minutes 6.5 --workdir /tmp \
  --out "$OUT/bench-io-gpu" "$@" 2>&1 | tee "$OUT/log"
