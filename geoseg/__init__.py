"""geoseg: satellite imagery to land-cover maps, tiled, seam-free and distributed.

The names below load their module on first use (PEP 562), so ``import geoseg.vector`` or
``geoseg info`` does not pay for torch, Dask and the models; ``geoseg.predict_raster`` works as usual.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module that defines it .
_EXPORTS = {
    "ModelContract": "geoseg.checkpoint",
    "check_scene": "geoseg.checkpoint",
    "contract_for": "geoseg.checkpoint",
    "file_sha256": "geoseg.checkpoint",
    "load_checkpoint": "geoseg.checkpoint",
    "save_checkpoint": "geoseg.checkpoint",
    "ClassSchema": "geoseg.config",
    "ModelConfig": "geoseg.config",
    "PredictConfig": "geoseg.config",
    "TrainConfig": "geoseg.config",
    "load_config": "geoseg.config",
    "BandMismatchError": "geoseg.errors",
    "CheckpointError": "geoseg.errors",
    "ConfigError": "geoseg.errors",
    "DatasetError": "geoseg.errors",
    "GeosegError": "geoseg.errors",
    "InvalidSceneError": "geoseg.errors",
    "OutputExistsError": "geoseg.errors",
    "SceneNotFoundError": "geoseg.errors",
    "VectorExportError": "geoseg.errors",
    "WeightsNotFoundError": "geoseg.errors",
    "VectorWriter": "geoseg.vector.writer",
    "Scene": "geoseg.inbox",
    "find_scenes": "geoseg.inbox",
    "read_ledger": "geoseg.inbox",
    "take_inventory": "geoseg.inbox",
    "write_ledger": "geoseg.inbox",
    "build_model": "geoseg.models",
    "receptive_field": "geoseg.models",
    "required_stride": "geoseg.models",
    "RunPlan": "geoseg.pipeline",
    "RunResult": "geoseg.pipeline",
    "plan_run": "geoseg.pipeline",
    "predict_raster": "geoseg.pipeline",
    "Predictor": "geoseg.predict",
    "resolve_device": "geoseg.predict",
    "SceneInfo": "geoseg.raster",
    "band_stats": "geoseg.raster",
    "open_scene": "geoseg.raster",
    "read_window": "geoseg.raster",
    "resolve_bands": "geoseg.raster",
    "stitch_blocks": "geoseg.stitch",
    "seam_index": "geoseg.stitch",
    "Block": "geoseg.tiling",
    "Box": "geoseg.tiling",
    "TileGrid": "geoseg.tiling",
    "align_block_size": "geoseg.tiling",
    "context_margin": "geoseg.tiling",
    "plan_blocks": "geoseg.tiling",
    "VectorizeSummary": "geoseg.vector",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'geoseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
