# The two commands: `make demo` (set up, run the main job on the bundled sample) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TMP := $(CURDIR)/.tmp
export PREFECT_HOME ?= $(TMP)/prefect
export DASK_TEMPORARY_DIRECTORY ?= $(TMP)/dask
export MPLCONFIGDIR ?= $(TMP)/matplotlib
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test serve lint clean lock

# Installs exactly the versions in constraints.txt (the environment the tests pass with).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

DEMO_SCENE := data/nc-landsat-lulc/lsat7_2000_6band.tif
DEMO_MODEL := data/models/nc_landclass96_deeplabv3_mobilenetv3.pt
DEMO_OUT ?= out/demo

demo: setup
	$(PY) flows/predict.py $(DEMO_SCENE) $(DEMO_MODEL) $(DEMO_OUT) configs/predict/demo.yaml

test: setup
	bash scripts/install_chromium.sh
	$(PY) -m ruff check geoseg flows bench tests scripts
	$(PY) -m pytest

# Local Prefect server + the predict, nightly batch and train deployments (SERVE_ARGS="--checkpoint ...").
serve: setup
	$(PY) flows/serve.py $(SERVE_ARGS)

lint: setup
	$(PY) -m ruff check geoseg flows bench tests scripts

clean:
	rm -rf $(TMP) out .pytest_cache

# Refresh constraints.txt: resolve pyproject.toml's ranges anew in a fresh venv and freeze what it got.
lock:
	rm -rf $(TMP)/lock-venv
	$(PYTHON) -m venv $(TMP)/lock-venv
	$(TMP)/lock-venv/bin/python -m pip install -q --upgrade pip
	$(TMP)/lock-venv/bin/python -m pip install -q -e '.[dev]'
	{ echo "# The whole environment geoseg is tested with (pip constraints). Refresh: make lock"; \
	  $(TMP)/lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^geoseg'; } > constraints.txt
	rm -rf $(TMP)/lock-venv
