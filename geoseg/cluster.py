"""Dask clients from settings: a local (CUDA) cluster, SLURM or PBS jobs, or an existing scheduler.

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
    from dask_jobqueue.core import JobQueueCluster

    from geoseg.config import BatchCluster, PredictConfig

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


def jobqueue_cluster(spec: BatchCluster, *, threads: int = 1) -> JobQueueCluster:
    """A dask-jobqueue cluster of SLURM or PBS jobs as ``spec`` says; nothing is submitted until it is scaled.

    Each job runs one worker process with one task thread (blocks run one at a time, torch uses
    ``threads`` of the job's ``spec.cores`` CPUs, as on a local cluster) after ``spec.prologue``. The
    scheduler runs in this process.
    """
    from dask_jobqueue import PBSCluster, SLURMCluster

    directives = list(spec.directives)
    common = dict(
        cores=1, processes=1, memory=spec.memory, walltime=spec.walltime, queue=spec.queue, account=spec.account,
        job_script_prologue=[f"export OMP_NUM_THREADS={threads}", *spec.prologue], interface=spec.interface,
        worker_extra_args=["--resources", f"{GPU_RESOURCE}={spec.gpus}"] if spec.gpus else [],
        job_name="geoseg-worker", silence_logs="error",
    )
    if spec.kind == "slurm":
        if spec.gpus:
            directives.append(f"--gres=gpu:{spec.gpus}")
        return SLURMCluster(job_cpu=spec.cores, job_extra_directives=directives, **common)
    gpus = f":ngpus={spec.gpus}" if spec.gpus else ""
    return PBSCluster(resource_spec=f"select=1:ncpus={spec.cores}:mem={spec.memory}{gpus}",
                      job_extra_directives=directives, **common)


@contextmanager
def jobqueue_client(spec: BatchCluster, *, threads: int = 1) -> Iterator[Client]:
    """Submit ``spec.jobs`` worker jobs, yield a client once the first worker has joined; cancel them on exit."""
    with jobqueue_cluster(spec, threads=threads) as cluster:
        cluster.scale(jobs=spec.jobs)
        log.info("submitted %d %s job(s); waiting for the first worker to start", spec.jobs, spec.kind.upper())
        with Client(cluster) as client:
            client.wait_for_workers(1)
            yield client


def cluster_for(config: PredictConfig) -> AbstractContextManager[Client | None]:
    """The cluster the settings ask for: SLURM/PBS jobs, none for one local worker, or :func:`dask_client`."""
    if config.cluster is not None:
        return jobqueue_client(config.cluster, threads=config.threads)
    if config.workers == 1 and not config.scheduler:
        return nullcontext(None)
    return dask_client(workers=config.workers, scheduler=config.scheduler, device=config.device, threads=config.threads)


def gpu_workers(client: Client) -> int:
    """How many connected workers advertise the GPU resource."""
    info = client.scheduler_info()["workers"].values()
    return sum(1 for w in info if w.get("resources", {}).get(GPU_RESOURCE))
