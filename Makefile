# The two commands: `make demo` (set up, run the main job on the bundled sample) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TMP := $(CURDIR)/.tmp
export PREFECT_HOME ?= $(TMP)/prefect
export DASK_TEMPORARY_DIRECTORY ?= $(TMP)/dask
export MPLCONFIGDIR ?= $(TMP)/matplotlib
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test serve lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

DEMO_SCENE := data/nc-landsat-lulc/lsat7_2000_6band.tif
DEMO_MODEL := data/models/nc_landsat_deeplabv3_mobilenetv3.pt
DEMO_OUT ?= out/demo

demo: setup
	$(PY) flows/predict.py $(DEMO_SCENE) $(DEMO_MODEL) $(DEMO_OUT) configs/predict/demo.yaml

test: setup
	bash scripts/install_chromium.sh
	$(PY) -m ruff check geoseg flows bench tests
	$(PY) -m pytest

# Local Prefect server + the predict, nightly batch and train deployments (SERVE_ARGS="--checkpoint ...").
serve: setup
	$(PY) flows/serve.py $(SERVE_ARGS)

lint: setup
	$(PY) -m ruff check geoseg flows bench tests

clean:
	rm -rf $(TMP) out .pytest_cache
