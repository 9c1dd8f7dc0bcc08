"""Serve the geoseg deployments (predict, the nightly batch, train) with one command.

``python flows/serve.py --checkpoint CKPT`` (from anywhere; it works in the repository root):

1. ``PREFECT_HOME`` defaults to ``<repo>/.tmp/prefect`` (database, logs, UI build).
2. Without ``PREFECT_API_URL`` it starts a local Prefect server on ``127.0.0.1:--port`` (UI included;
   its log in ``$PREFECT_HOME/server.log``), or reuses one already answering there, and stops what
   it started on exit. With ``PREFECT_API_URL`` set it uses that server (remote, or Prefect Cloud).
3. It serves ``geoseg-predict/predict``, ``geoseg-batch/nightly`` (cron ``--cron``, default 02:00) and
   ``geoseg-train/train`` (when ``flows/train.py`` exists) from this process: a run started from the UI,
   the API or the schedule runs here as a subprocess. Ctrl-C stops serving (and pauses the schedule).

Settings come from ``configs/`` (predict and batch: ``configs/predict/default.yaml``, train:
``configs/train/nc_landclass96.yaml``), passed as paths, so edits apply from the next run on.
``--scheduler tcp://host:8786`` points predict and batch at an existing Dask cluster.
``--work-pool NAME`` registers the same deployments with a work pool instead of serving them
(run ``prefect worker start --pool NAME`` where the runs should execute).

Why ``serve`` and not ``prefect.yaml``: the deployments live in code next to the flows, read their
settings from ``configs/``, need no work pool or worker to try out, and one process both registers
and runs them; ``--work-pool`` covers the production shape without a second definition.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("geoseg.serve")

#: Default predict settings for the predict and batch deployments (relative to the repository root).
PREDICT_CONFIG = "configs/predict/default.yaml"
#: Default training settings for the train deployment.
TRAIN_CONFIG = "configs/train/nc_landclass96.yaml"
#: Nightly at 02:00.
NIGHTLY = "0 2 * * *"


def default_prefect_home() -> str:
    """Set ``PREFECT_HOME`` to ``<repo>/.tmp/prefect`` unless it is set; return it."""
    os.environ.setdefault("PREFECT_HOME", str(ROOT / ".tmp" / "prefect"))
    return os.environ["PREFECT_HOME"]


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect API answers ``/health`` at ``api_url`` (``http://host:port/api``)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


#: Runs a command that gets SIGTERM when the process that started it dies, however it dies (Linux:
#: ``prctl(PR_SET_PDEATHSIG)``, kept across ``exec``): a killed geoseg leaves no server behind.
_ENDS_WITH_PARENT = [sys.executable, "-c", (
    "import ctypes, os, signal, sys\n"
    "try:\n    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)\n"
    "except (OSError, AttributeError):\n    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n    sys.exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])"
)]


class PrefectServer:
    """A ``prefect server start`` subprocess on 127.0.0.1 (with its UI), stopped by :meth:`stop`.

    It runs in its own process group, so Ctrl-C in a terminal reaches the flow (which then still
    reports its state) and not the server, and it ends when the process that started it dies.

    Args:
        port: TCP port of the API and UI.
        home: ``PREFECT_HOME`` of the server (its SQLite database goes there unless ``env`` names one).
        env: extra environment for the server, e.g. ``PREFECT_API_DATABASE_CONNECTION_URL``.
        log_path: where the server's output goes (default ``home/server.log``).
    """

    def __init__(self, port: int, home: str | Path, *, env: dict[str, str] | None = None,
                 log_path: str | Path | None = None) -> None:
        self.port = port
        self.home = Path(home)
        self.log_path = Path(log_path) if log_path else self.home / "server.log"
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.ui_url = f"http://127.0.0.1:{port}"
        self.env = {
            "PREFECT_UI_ENABLED": "true",
            "PREFECT_UI_API_URL": self.api_url,  # where the UI calls the API (Prefect's default is port 4200)
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
            **os.environ,
            "PREFECT_HOME": str(self.home),
            **(env or {}),
        }
        self.env.pop("PREFECT_API_URL", None)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> PrefectServer:
        """Start the server and wait until ``/api/health`` answers.

        Raises:
            RuntimeError: the server exited or did not answer within ``timeout`` seconds; the message
                holds the end of its log.
        """
        prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or shutil.which("prefect")
        command = [prefect] if prefect else [sys.executable, "-m", "prefect"]
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                [*_ENDS_WITH_PARENT, str(os.getpid()), *command, "server", "start", "--host", "127.0.0.1",
                 "--port", str(self.port)],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, so stop() ends its children too
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the Prefect server exited with code {self.process.returncode}:\n{self.log_tail()}")
            if healthy(self.api_url):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"the Prefect server did not answer at {self.api_url} in {timeout:.0f} s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server (SIGTERM to its process group, then SIGKILL)."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=timeout)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def prefect_api() -> Iterator[str]:
    """The Prefect API a command-line run reports to, for as long as the block runs.

    The configured one (``PREFECT_API_URL``), else a temporary local server with its UI. Yields the
    UI's address.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_UI_URL.value() or PREFECT_API_URL.value()
        return
    from prefect.logging.handlers import APILogWorker

    server = PrefectServer(free_port(), default_prefect_home()).start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.ui_url
    finally:
        APILogWorker.drain_all(timeout=10)  # logs and events still queued go out while the server is up
        server.stop()


def _train_flow() -> Any | None:
    """The train flow from ``flows/train.py``, or None (logged) while that module does not exist."""
    try:
        module = importlib.import_module("flows.train")
    except ModuleNotFoundError as err:
        if err.name not in ("flows.train", "flows"):
            log.error("train deployment skipped: flows/train.py cannot be imported: %s", err)
            return None
        log.warning("train deployment skipped: flows/train.py does not exist yet")
        return None
    except Exception as err:  # a broken train module must not keep predict and the batch from being served
        log.error("train deployment skipped: flows/train.py cannot be imported: %s: %s", type(err).__name__, err)
        return None
    return module.train


def build_deployments(
    *,
    checkpoint: str | None = None,
    inbox: str = "inbox",
    out_root: str = "out/batch",
    predict_config: str = PREDICT_CONFIG,
    train_config: str = TRAIN_CONFIG,
    cron: str = NIGHTLY,
    timezone: str = "UTC",
    concurrency: int = 1,
    scheduler: str | None = None,
    work_pool: str | None = None,
) -> list[Any]:
    """The geoseg deployments (``RunnerDeployment`` objects) for ``prefect.serve`` or ``prefect.deploy``.

    Args:
        checkpoint: checkpoint of the nightly batch; without one the batch is deployed unscheduled.
        inbox: folder or glob the nightly batch reads scenes from.
        out_root: where the nightly batch writes (one folder per scene, and its ledger).
        predict_config: predict settings YAML for the predict and batch deployments.
        train_config: training settings YAML for the train deployment.
        cron: schedule of the nightly batch.
        timezone: time zone of ``cron`` (IANA name).
        concurrency: scenes the batch runs at the same time.
        scheduler: address of an existing Dask scheduler for predict and batch (None: a local cluster).
        work_pool: register for this work pool (flows loaded from this repository) instead of serving.
    """
    from prefect import Flow
    from prefect.schedules import Cron

    from flows.batch import batch
    from flows.predict import predict

    def source(flow: Flow, entrypoint: str) -> Flow:
        # A work pool's worker loads the flow from this checkout; serve runs the imported object.
        return Flow.from_source(str(ROOT), entrypoint) if work_pool else flow

    common: dict[str, Any] = {"tags": ["geoseg"], "work_pool_name": work_pool} if work_pool else {"tags": ["geoseg"]}
    deployments = [
        source(predict, "flows/predict.py:predict").to_deployment(
            "predict",
            parameters={"config": predict_config, **({"scheduler": scheduler} if scheduler else {})},
            description="Classify one scene: pass scene, checkpoint and out_dir.",
            **common,
        )
    ]
    batch_parameters: dict[str, Any] = {
        "inbox": inbox, "out_root": out_root, "config": predict_config, "concurrency": concurrency,
        **({"checkpoint": checkpoint} if checkpoint else {}), **({"scheduler": scheduler} if scheduler else {}),
    }
    if checkpoint:
        schedule: dict[str, Any] = {"schedule": Cron(cron, timezone=timezone)}
    else:
        schedule = {}
        log.warning("nightly batch not scheduled: no --checkpoint given (it can still be run by hand)")
    deployments.append(
        source(batch, "flows/batch.py:batch").to_deployment(
            "nightly",
            parameters=batch_parameters,
            concurrency_limit=1,  # one batch at a time: a scene is never processed twice at once
            description=f"Classify every new scene of {inbox} into {out_root}.",
            **schedule,
            **common,
        )
    )
    train = _train_flow()
    if train is not None:
        deployments.append(
            source(train, "flows/train.py:train").to_deployment(
                "train", parameters={"config": train_config}, description="Train a model from a config.", **common
            )
        )
    return deployments


def _resolve(path: str | None) -> str | None:
    """``path`` made absolute against the caller's working directory (a glob stays a glob)."""
    return None if path is None else str(Path(os.path.expanduser(path)).absolute())


def main(argv: Sequence[str] | None = None) -> int:
    """Start (or find) the Prefect server and serve the deployments until interrupted."""
    parser = argparse.ArgumentParser(description="Serve the geoseg deployments (predict, nightly batch, train).")
    parser.add_argument("--port", type=int, default=4200, help="port of the local server (default 4200)")
    parser.add_argument("--checkpoint", help="checkpoint of the nightly batch (without: batch unscheduled)")
    parser.add_argument("--inbox", help="folder or glob of the nightly batch (default <repo>/inbox)")
    parser.add_argument("--out-root", help="output root of the nightly batch (default <repo>/out/batch)")
    parser.add_argument("--predict-config", help=f"predict settings (default <repo>/{PREDICT_CONFIG})")
    parser.add_argument("--train-config", help=f"training settings (default <repo>/{TRAIN_CONFIG})")
    parser.add_argument("--cron", default=NIGHTLY, help=f"batch schedule (default {NIGHTLY!r})")
    parser.add_argument("--timezone", default="UTC", help="IANA time zone of --cron (default UTC)")
    parser.add_argument("--concurrency", type=int, default=1, help="scenes the batch runs at once (default 1)")
    parser.add_argument("--scheduler", help="address of an existing Dask scheduler, e.g. tcp://host:8786")
    parser.add_argument("--work-pool", help="register with this work pool instead of serving")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # Prefect adds its own root handler once imported

    home = default_prefect_home()
    given = {k: _resolve(getattr(args, k)) for k in ("checkpoint", "inbox", "out_root", "predict_config",
                                                       "train_config")}
    os.chdir(ROOT)  # deployments' entrypoints (flows/*.py) and default paths are relative to the repository root
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    server = None
    if os.environ.get("PREFECT_API_URL"):
        log.info("using the Prefect server at %s", os.environ["PREFECT_API_URL"])
    else:
        candidate = PrefectServer(args.port, home)
        if healthy(candidate.api_url):
            log.info("a Prefect server already answers at %s; using it", candidate.ui_url)
        else:
            log.info("starting a Prefect server at %s (log: %s)", candidate.ui_url, candidate.log_path)
            try:
                server = candidate.start()
            except RuntimeError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
        os.environ["PREFECT_API_URL"] = candidate.api_url  # before prefect is imported
    try:
        deployments = build_deployments(
            checkpoint=given["checkpoint"], inbox=given["inbox"] or "inbox", out_root=given["out_root"] or "out/batch",
            predict_config=given["predict_config"] or PREDICT_CONFIG,
            train_config=given["train_config"] or TRAIN_CONFIG, cron=args.cron, timezone=args.timezone,
            concurrency=args.concurrency, scheduler=args.scheduler, work_pool=args.work_pool,
        )
        if args.work_pool:
            from prefect import deploy

            deploy(*deployments, work_pool_name=args.work_pool, build=False, push=False)
            print(f"registered {len(deployments)} deployments with work pool {args.work_pool!r}; "
                  f"start a worker: prefect worker start --pool {args.work_pool}")
        else:
            from prefect import serve

            serve(*deployments)
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            log.info("stopping the Prefect server")
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
