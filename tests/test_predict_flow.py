"""The Prefect predict flow under prefect_test_harness: outputs and artifacts."""

import json

import pytest
import rasterio
from conftest import NC_SCENE, flow_run_artifacts

from flows.predict import predict


@pytest.mark.slow
def test_flow_writes_outputs_and_artifacts(harness, tiny_checkpoint, tmp_path):
    state = predict(str(NC_SCENE), str(tiny_checkpoint), str(tmp_path), config={"block_size": 128,
                    "vectorize": False}, workers=2, return_state=True)
    assert state.is_completed()
    outputs = state.result()
    with rasterio.open(outputs["class_map"]) as cls, rasterio.open(NC_SCENE) as src:
        assert cls.crs == src.crs and cls.transform == src.transform and cls.shape == src.shape
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["blocks_computed"] == summary["grid"]["blocks"]

    artifacts = flow_run_artifacts(state.state_details.flow_run_id)
    by_type = {}
    for a in artifacts:
        by_type.setdefault(a.type, []).append(a)
    assert set(by_type) >= {"progress", "table", "markdown"}
    assert by_type["progress"][0].data == 100.0
    table = by_type["table"][0].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["class"] for r in rows] == [a["class_name"] for a in summary["class_areas"]]
    assert sum(r["percent"] for r in rows) == pytest.approx(100, abs=0.05)
    by_key = {a.key: a for a in artifacts}
    md = by_key["predict-summary"].data
    assert outputs["class_map"] in md and "summary.json" in md
    assert "](data:image/png;base64," in by_key["quicklook"].data and outputs["quicklook"] in by_key["quicklook"].data


@pytest.mark.slow
def test_flow_fails_with_clear_error(harness, tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_text("not a raster")
    state = predict(str(bad), str(tiny_checkpoint), str(tmp_path / "out"), return_state=True)
    assert state.is_failed()
    assert "not a raster GDAL can read" in state.message or "not a raster" in str(state.result(raise_on_failure=False))
