"""Dask clients from settings: a local process cluster, a local CUDA cluster, or an existing scheduler.

GPU workers advertise a ``GPU`` resource (one per worker) and inference tasks ask for it, so a mixed
cluster never runs a block on a CPU-only worker by accident.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from distributed import Client, LocalCluster, WorkerPlugin

from geoseg.errors import ConfigError

if TYPE_CHECKING:
    from geoseg.config import PredictConfig

log = logging.getLogger(__name__)

#: Resource that GPU workers advertise and inference tasks request.
GPU_RESOURCE = "GPU"


def _cuda_devices() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _local_directory() -> str:
    path = Path(os.environ.get("DASK_TEMPORARY_DIRECTORY", Path.cwd() / ".tmp" / "dask"))
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def default_workers(device: str = "auto") -> int:
    """One worker per GPU when GPUs are used, else one per CPU core."""
    gpus = _cuda_devices() if device != "cpu" else 0
    return gpus or os.cpu_count() or 1


@contextmanager
def dask_client(
    *, workers: int | None = None, scheduler: str | None = None, device: str = "auto", threads: int = 1
) -> Iterator[Client]:
    """Yield a connected client, closing what this call started on exit.

    Args:
        workers: local worker processes (ignored with ``scheduler``); None: :func:`default_workers`;
            with CUDA, at most one per GPU.
        scheduler: address of a running scheduler, e.g. ``tcp://10.0.0.5:8786``.
        device: ``"cpu"`` forces a CPU cluster; ``"cuda"`` requires GPUs; ``"auto"`` uses them if present.
        threads: OpenMP threads per local worker process.
    """
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as err:
            raise ConfigError(f"cannot reach the Dask scheduler at {scheduler}: {err}. Is it running?") from None
        with client:
            yield client
        return
    gpus = _cuda_devices() if device != "cpu" else 0
    if device == "cuda" and not gpus:
        raise ConfigError("device is 'cuda' but no CUDA GPU is visible; use device: cpu or auto")
    workers = workers or default_workers(device)
    if gpus:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise ConfigError("GPUs found but dask-cuda is not installed: pip install dask-cuda") from None
        n = min(workers, gpus)
        visible = ",".join(str(i) for i in range(n))
        cluster = LocalCUDACluster(
            CUDA_VISIBLE_DEVICES=visible, resources={GPU_RESOURCE: 1}, local_directory=_local_directory()
        )
    else:
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            local_directory=_local_directory(),
            env={"OMP_NUM_THREADS": str(threads)},
        )
    log.info("started %s with %d worker(s)", type(cluster).__name__, len(cluster.workers))
    with cluster, Client(cluster) as client:
        client.register_plugin(IgnoreCtrlC(), name="geoseg-ignore-ctrl-c")
        yield client


class IgnoreCtrlC(WorkerPlugin):
    """Local workers ignore SIGINT; the client ends the run and the cluster cleanly.

    Ctrl-C in a terminal reaches the whole process group: a worker would print a traceback and die.
    """

    def setup(self, worker: object) -> None:  # noqa: D102
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def cluster_for(config: PredictConfig) -> AbstractContextManager[Client | None]:
    """The cluster a predict run's settings ask for: none for one local worker, else :func:`dask_client`."""
    if config.workers == 1 and not config.scheduler:
        return nullcontext(None)
    return dask_client(workers=config.workers, scheduler=config.scheduler, device=config.device, threads=config.threads)


def gpu_workers(client: Client) -> int:
    """How many connected workers advertise the GPU resource."""
    info = client.scheduler_info()["workers"].values()
    return sum(1 for w in info if w.get("resources", {}).get(GPU_RESOURCE))
