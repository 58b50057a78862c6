# Set-up is part of every target: a fresh machine needs nothing but python3.11 and make.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

INFERENCE_VENV ?= .venv-inference

.PHONY: dev test lint inference-env bench-proxy

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[gateway,dev]'
	rm -f $(VENV)/.installed-* && touch $@

## Run the embedded default: gateway + local vLLM tier (or UPSTREAM=<OpenAI-compatible URL>)
dev: $(STAMP)
	$(BIN)/bastion dev --inference-venv $(INFERENCE_VENV) $(if $(UPSTREAM),--upstream $(UPSTREAM)) $(ARGS)

## vLLM's own environment (CPU build), for the tier's tests and `bastion dev`; once
inference-env: $(STAMP)
	$(BIN)/bastion inference install $(INFERENCE_VENV)

## Lint and run the whole test suite (real vLLM on CPU included)
test: $(STAMP) lint inference-env
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## Gateway overhead against nginx and LiteLLM (by hand; needs nginx and wrk from apt)
bench-proxy: $(STAMP)
	$(BIN)/python bench/proxy_overhead.py $(ARGS)
