"""The training wing: labelled data, spatial splits, the training loop, scores and comparisons.

Modules, in the order data flows through them:

- :mod:`~geoseg.train.labels`: labels (rasters or vectors) onto a scene's grid, as channel indices.
- :mod:`~geoseg.train.datasets`: the labelled scenes or tiles of a train config, and training tiles.
- :mod:`~geoseg.train.splits`: spatial train/val/test blocks (one lattice on the ground for several
  scenes) and class-balanced tile sampling.
- :mod:`~geoseg.train.augment`: geometric and spectral augmentation of one tile.
- :mod:`~geoseg.train.losses`: cross-entropy and cross-entropy + soft Dice.
- :mod:`~geoseg.train.loop`: :func:`train`, cut into setup, epoch, checkpointing and finish.
- :mod:`~geoseg.train.metrics`: confusion matrix, IoU, F1, macro mIoU, accuracy; curve plots.
- :mod:`~geoseg.train.scoring`: whole-scene scores through the predict path's tiling and blending.
- :mod:`~geoseg.train.evaluate`: ``geoseg evaluate`` (a checkpoint against labels, via predict).
- :mod:`~geoseg.train.compare`: several models on one split (``geoseg compare``).
"""

from geoseg.train.loop import TrainResult, export_checkpoint, load_training_data, make_data_split, train

__all__ = ["TrainResult", "export_checkpoint", "load_training_data", "make_data_split", "train"]
