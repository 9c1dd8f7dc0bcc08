"""Run the geoseg CLI or the predict flow's command line with a fault injected at a chosen call.

    python tests/hooked.py --at geoseg.pipeline:finalise --signal TERM [--nth N] [--delay S] [--group] \
        cli predict ...
    python tests/hooked.py --at geoseg.worker:write_block --signal KILL --nth 5 -- flow SCENE CKPT OUT [CONFIG]

On the ``nth`` call of ``module:function`` the process sends itself ``signal`` (to its whole
process group with ``--group``, as Ctrl-C in a terminal does; to one of its Dask worker processes
with ``--worker``), ``delay`` seconds after the call
starts (from a timer thread, so it lands in the middle of the real work), then the real function
runs. The patch is made before the entry point is imported, so the stage sequence calls it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--at", required=True, help="module:function to hook")
    parser.add_argument("--signal", required=True, help="INT, TERM or KILL")
    parser.add_argument("--nth", type=int, default=1)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--group", action="store_true", help="signal the whole process group")
    parser.add_argument("--worker", action="store_true", help="signal one Dask worker process instead")
    parser.add_argument("entry", choices=["cli", "flow"])
    parser.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args()
    module_name, name = opts.at.split(":")
    module = importlib.import_module(module_name)
    real = getattr(module, name)
    signum = getattr(signal, f"SIG{opts.signal}")
    calls = [0]

    def fire() -> None:
        if opts.worker:
            import psutil

            workers = [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]
            print(f"hooked: SIG{opts.signal} to worker {workers[0].pid} at {opts.at}", file=sys.stderr, flush=True)
            workers[0].send_signal(signum)
            return
        print(f"hooked: SIG{opts.signal} at {opts.at}", file=sys.stderr, flush=True)
        if opts.group:
            os.killpg(0, signum)
        else:
            os.kill(os.getpid(), signum)

    def hooked(*args, **kwargs):
        calls[0] += 1
        if calls[0] == opts.nth:
            if opts.delay:
                threading.Timer(opts.delay, fire).start()
            else:
                fire()
        return real(*args, **kwargs)

    setattr(module, name, hooked)
    if opts.entry == "cli":
        from geoseg.cli import main as cli_main

        sys.argv = ["geoseg", *opts.args]
        cli_main()
    else:
        sys.path.insert(0, str(ROOT))
        from flows.predict import main as flow_main

        sys.exit(flow_main(opts.args))


if __name__ == "__main__":
    main()
