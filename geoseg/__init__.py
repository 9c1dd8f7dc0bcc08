"""geoseg: satellite imagery to land-cover maps, tiled, seam-free and distributed."""

__version__ = "0.1.0"

from geoseg.checkpoint import ModelContract, check_scene, contract_for, file_sha256, load_checkpoint, save_checkpoint
from geoseg.config import ClassSchema, ModelConfig, PredictConfig, TrainConfig, load_config
from geoseg.errors import (
    BandMismatchError,
    CheckpointError,
    ConfigError,
    DatasetError,
    GeosegError,
    InvalidSceneError,
    OutputExistsError,
    SceneNotFoundError,
    VectorExportError,
    WeightsNotFoundError,
)
from geoseg.export.vector import VectorWriter
from geoseg.inbox import Scene, find_scenes, read_ledger, take_inventory, write_ledger
from geoseg.models import build_model, receptive_field, required_stride
from geoseg.pipeline import RunPlan, RunResult, plan_run, predict_raster
from geoseg.predict import Predictor, resolve_device
from geoseg.raster import SceneInfo, band_stats, open_scene, read_window, resolve_bands
from geoseg.stitch import blend_block, seam_index
from geoseg.tiling import Block, Box, TileGrid, align_block_size, context_margin, plan_blocks
from geoseg.vectorize import VectorizeSummary  # geoseg.vectorize stays the module: vectorize.vectorize(...)

__all__ = [
    "VectorWriter",
    "VectorizeSummary",
    "Scene",
    "find_scenes",
    "read_ledger",
    "take_inventory",
    "write_ledger",
    "ModelContract",
    "Predictor",
    "RunPlan",
    "RunResult",
    "blend_block",
    "plan_run",
    "predict_raster",
    "seam_index",
    "build_model",
    "check_scene",
    "contract_for",
    "file_sha256",
    "load_checkpoint",
    "receptive_field",
    "required_stride",
    "resolve_device",
    "save_checkpoint",
    "BandMismatchError",
    "Block",
    "Box",
    "CheckpointError",
    "ClassSchema",
    "ConfigError",
    "DatasetError",
    "GeosegError",
    "InvalidSceneError",
    "ModelConfig",
    "OutputExistsError",
    "PredictConfig",
    "SceneInfo",
    "SceneNotFoundError",
    "TileGrid",
    "TrainConfig",
    "VectorExportError",
    "WeightsNotFoundError",
    "align_block_size",
    "band_stats",
    "context_margin",
    "load_config",
    "open_scene",
    "plan_blocks",
    "read_window",
    "resolve_bands",
]
