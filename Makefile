# `make test` and `make demo` work on a fresh clone: they create .venv, install, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# faiss-gpu where nvidia-smi lists a GPU, faiss-cpu elsewhere (never both: same `faiss/` folder).
FAISS_EXTRA := $(shell nvidia-smi -L 2>/dev/null | grep -q GPU && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(FAISS_EXTRA)

.PHONY: install test test-fast demo lint clean browser

# The serving page's browser test needs Debian's chromium + chromium-driver: installed here when
# missing and apt-get can run (CI runs as root); elsewhere the test skips with the reason.
browser:
	@if ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else echo "chromium-driver missing and apt-get not usable: the browser test will skip"; fi; \
	fi

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[$(FAISS_EXTRA),dev,plots,pretrained,export]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

test: install browser
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(PY) pipelines/demo.py --out outputs/demo

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs .pytest_cache
