"""The top-level package: every public name resolves, and light entry points stay light."""

import subprocess
import sys

import geoseg


def test_every_public_name_resolves():
    for name in geoseg.__all__:
        assert getattr(geoseg, name).__name__ == name
    assert "predict_raster" in dir(geoseg)


def test_vectorize_does_not_import_torch():
    """Vectorise workers import geoseg.vector; torch and Dask would cost each one ~0.7 GB."""
    code = "import sys, geoseg.vector; print('torch' in sys.modules, 'distributed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
