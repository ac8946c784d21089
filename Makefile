# `make test` and `make demo` work on a fresh clone: they create .venv, install, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# faiss-gpu where nvidia-smi lists a GPU, faiss-cpu elsewhere (never both: same `faiss/` folder).
FAISS_EXTRA := $(shell nvidia-smi -L 2>/dev/null | grep -q GPU && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(FAISS_EXTRA)

.PHONY: install test test-fast demo lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[$(FAISS_EXTRA),dev,plots,pretrained,export]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(PY) pipelines/demo.py --out outputs/demo

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs .pytest_cache
