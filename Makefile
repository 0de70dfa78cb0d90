# adapters_lab: `make demo` and `make test` are the two set-up commands (see README).
PY_SYS ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test
install: $(VENV)/.installed

# Torch first, pinned, so pip takes the local CPU wheel instead of pulling CUDA packages.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(PY) run.py experiment=demo

test: install
	$(PY) -m pytest -q
