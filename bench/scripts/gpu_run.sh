#!/usr/bin/env bash
# Everything rcengine runs on the GPU machine, in one call of the device tool (carry .whl: see
# ../shared/gpu/README.md).  Each part runs under its own time limit, and what it wrote under $OUT
# comes back even when a part is cut short.
#
#   bash bench/scripts/gpu_run.sh tests                 # the whole test suite  ($OUT/tests.log)
#   bash bench/scripts/gpu_run.sh decode [ARGS...]      # bench/scripts/gpu_decode.py   ($OUT/gpu_decode.json, decode.log)
#   bash bench/scripts/gpu_run.sh tests decode [ARGS]   # both, tests first
#   bash bench/scripts/gpu_run.sh tests topk decode ... # with bench/scripts/topk_bench.py between ($OUT/topk_bench.json, topk.log)
#   bash bench/scripts/gpu_run.sh disk [ARGS...]        # bench/scripts/disk_decode.py on the 8B shape ($OUT/disk_decode.json, disk.log)
#   bash bench/scripts/gpu_run.sh calibrate [ARGS...]   # bench/scripts/calibrate_time.py on the 8B shape ($OUT/calibrate_time.json, calibrate.log)
#   bash bench/scripts/gpu_run.sh prefill [ARGS...]     # bench/scripts/prefill_writes.py on the 8B shape ($OUT/prefill_writes.json, prefill.log)
#
# TESTS_S, DECODE_S, DISK_S, CALIBRATE_S and PREFILL_S (seconds) bound the parts; PYTEST_ARGS picks tests (default:
# all, over 8 pytest-xdist workers when its wheels were fetched: bash ../shared/gpu/wheels.sh pytest-xdist execnet
# pytest-timeout; the whole suite then takes about 2 minutes there; tests/test_object_store.py skips there: s3fs,
# moto and their needs are 34 MB of wheels, botocore 14 of them, more than a call carries beside the others); TESTS_PART=1 or 2 runs
# the first or second half of the test files, PYTEST_ARGS then holding options only, e.g.
# TESTS_PART=2 PYTEST_ARGS="--timeout=120" bash bench/scripts/gpu_run.sh tests).  With pytest-timeout among the wheels
# (bash ../shared/gpu/wheels.sh pytest-timeout), add --timeout=120 to name a hanging test.
set -uo pipefail
OUT=${OUT:-bench/out}
mkdir -p "$OUT" /tmp/pkg
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
ln -sfn "$PWD" /tmp/pkg/rcengine   # the repository root is the package
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${1:-}" = tests ]; then
  shift
  files=(tests/test_*.py)
  workers=""   # Triton's compiles and the subprocess tests dominate; 8 workers of 2 threads each share 16 cores
  if ls .whl/pytest_xdist-*.whl .whl/execnet-*.whl >/dev/null 2>&1; then workers="-n 8"; export OMP_NUM_THREADS=2; fi
  half=$(( (${#files[@]} + 1) / 2 ))
  case "${TESTS_PART:-}" in
    1) selected="${PYTEST_ARGS:-} ${files[*]:0:$half}" ;;   # PYTEST_ARGS then holds options only
    2) selected="${PYTEST_ARGS:-} ${files[*]:$half}" ;;
    *) selected="${PYTEST_ARGS:-$workers tests}" ;;
  esac
  # With pytest-timeout, pytest stops itself 30 s before the hard limit, so a cut run still lists its slowest tests.
  session=""
  if ls .whl/pytest_timeout-*.whl >/dev/null 2>&1; then session="--session-timeout=$(( ${TESTS_S:-590} - 30 ))"; fi
  timeout "${TESTS_S:-590}" python3 -m pytest -q -p no:cacheprovider --durations=30 -rfEs --tb=short $session $selected > "$OUT/tests.log" 2>&1
  echo "tests exit $?"; tail -n 30 "$OUT/tests.log"
fi
if [ "${1:-}" = topk ]; then
  shift
  timeout "${TOPK_S:-120}" python3 -m rcengine.bench.scripts.topk_bench --out "$OUT" > "$OUT/topk.log" 2>&1
  echo "topk exit $?"; cut -c1-400 "$OUT/topk.log" | tail -n 14
fi
if [ "${1:-}" = decode ]; then
  shift
  timeout "${DECODE_S:-540}" python3 -m rcengine.bench.scripts.gpu_decode --out "$OUT" "$@" > "$OUT/decode.log" 2>&1
  echo "decode exit $?"; tail -n 40 "$OUT/decode.log"
fi
if [ "${1:-}" = disk ]; then
  shift
  timeout "${DISK_S:-540}" python3 -m rcengine.bench.scripts.disk_decode --synthetic 8b --scratch /tmp --out "$OUT" "$@" > "$OUT/disk.log" 2>&1
  echo "disk exit $?"; df -h /tmp | tail -1; tail -n 40 "$OUT/disk.log" | cut -c1-600
fi
if [ "${1:-}" = calibrate ]; then
  shift
  timeout "${CALIBRATE_S:-540}" python3 -m rcengine.bench.scripts.calibrate_time --synthetic 8b --out "$OUT" "$@" > "$OUT/calibrate.log" 2>&1
  echo "calibrate exit $?"; tail -n 45 "$OUT/calibrate.log" | cut -c1-300
fi
if [ "${1:-}" = prefill ]; then
  shift
  timeout "${PREFILL_S:-540}" python3 -m rcengine.bench.scripts.prefill_writes --synthetic 8b --scratch /tmp --out "$OUT" "$@" > "$OUT/prefill.log" 2>&1
  echo "prefill exit $?"; tail -n 12 "$OUT/prefill.log" | cut -c1-700
fi
# At most 8 files come back from a call: the profiles travel as one.
if ls "$OUT"/profile*.txt >/dev/null 2>&1; then
  for f in "$OUT"/profile*.txt; do echo "##### $(basename "$f")"; cat "$f"; echo; done > "$OUT/all_profiles.txt" && rm -f "$OUT"/profile*.txt
fi
