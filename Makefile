# The two commands of the README:  `make run`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# ray: the scale-out tests start a local Ray cluster and an S3-compatible server (docs/scale-out.md)
EXTRAS ?= cpu,quant,dev,ray

.PHONY: install run test lint typecheck layers fuzz bench gpu-check clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch drags in a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
ifneq (,$(findstring dev,$(EXTRAS)))
	# the tests cover the openai-whisper backend too: pyproject's `openai-whisper` extra, without its
	# triton dependency (~1 GB, used only by CUDA word-timestamp kernels); its other deps are core ones
	$(BIN)/pip install -q --no-deps openai-whisper==20250625 more-itertools==11.2.1
endif
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python api_server.py --demo --api-port 8003

# The gates, in the order `make test` runs them (.pre-commit-config.yaml runs the same tools).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The import layers and no cycles (pyproject's [tool.importlinter] contracts; docs/architecture.md).
layers: $(STAMP)
	$(BIN)/lint-imports

test: lint typecheck layers
	$(BIN)/python -m pytest

# Schemathesis over the API's OpenAPI document with more generated requests than `make test` sends
# (tests/test_api_schemathesis.py: no 5xx, every error in OpenAI's envelope). FUZZ_EXAMPLES=N per operation and mode.
FUZZ_EXAMPLES ?= 300
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/test_api_schemathesis.py -s

# Benchmarks (minutes, several GB of full-size random bundles under bench/out); not part of the tests.
bench: $(STAMP)
	$(BIN)/python -m bench.bench_wav2token
	$(BIN)/python -m bench.bench_token2wav
	$(BIN)/python -m bench.bench_streaming_vocoder
	$(BIN)/python -m bench.bench_llm
	$(BIN)/python -m bench.bench_scheduler

# Validate a GPU host in one command (docs/deployment.md): every variant and mode through the real
# server on a full-size random bundle; exit 1 on any failure. Without CUDA it says so and exits 0.
# On a fresh GPU host: make gpu-check EXTRAS=gpu,quant,dev ; options: make gpu-check ARGS="--variants base"
gpu-check: $(STAMP)
	$(BIN)/python -m bench.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
