"""The one root error of geoseg and its subclasses.

Every subclass also inherits the matching built-in exception, so callers can catch either
``GeosegError`` or e.g. ``FileNotFoundError``. Messages say what is wrong, where, and what to do.
"""

from __future__ import annotations


class GeosegError(Exception):
    """Root of every error geoseg raises on purpose."""


class ConfigError(GeosegError, ValueError):
    """A settings file or option is invalid."""


class SceneNotFoundError(GeosegError, FileNotFoundError):
    """An input file does not exist."""


class InvalidSceneError(GeosegError, ValueError):
    """A scene cannot be used: not a raster, corrupt, no CRS, bad transform, bad dtype, no valid pixel."""


class BandMismatchError(GeosegError, ValueError):
    """The scene's bands do not match what the model or the request expects."""


class CheckpointError(GeosegError, ValueError):
    """A checkpoint is missing, unreadable, unsafe or inconsistent."""


class WeightsNotFoundError(GeosegError, FileNotFoundError):
    """Pretrained weights were asked for but no local file holds them."""


class OutputExistsError(GeosegError, FileExistsError):
    """An output already exists and overwriting was not allowed."""


class DatasetError(GeosegError, ValueError):
    """Training data or labels are invalid."""


class VectorExportError(GeosegError, ValueError):
    """Polygons cannot be written in the requested format."""


class OutputWriteError(GeosegError, OSError):
    """An output cannot be written: the folder is not writable, or the disk is full."""


class OutputLockedError(GeosegError, RuntimeError):
    """Another run is writing into the same output folder."""


class RunInterrupted(BaseException):
    """The run was stopped by a signal (Ctrl-C or SIGTERM); ``signum`` says which.

    Not an ``Exception`` (nor a ``KeyboardInterrupt``, which click turns into "Aborted!"): no
    ``except Exception`` on the way may swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum

    def __reduce__(self) -> tuple:
        return type(self), (self.signum,)


class StorageError(GeosegError, OSError):
    """Object storage or an HTTP server refused a request: access denied, or it cannot be reached."""
