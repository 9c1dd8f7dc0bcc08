"""Interruptions and faults of the main job, with real processes: how long each takes to stop or recover.

    python bench/faults.py [--factor 2] [--block-size 256]

Runs ``geoseg predict`` (and ``python flows/predict.py``) on the NC sample enlarged ``--factor``
times with the tiny stand-in model, injects each fault with ``tests/hooked.py`` and prints, per case:
the exit status, the seconds from the signal to the exit, processes left running, and whether the
rerun resumed (blocks skipped) to the same class map and confidence bytes as an undisturbed run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from conftest import NC_SCENE, make_tiny_checkpoint, upsampled_scene  # noqa: E402
from processes import cli, hooked, run  # noqa: E402

OUTPUTS = ("_classes.tif", "_confidence.tif")
CASES = [  # name, entry, hook, signal, options
    ("Ctrl-C in plan", "cli", "geoseg.pipeline:plan_stage", "INT", {"group": True}),
    ("SIGTERM in blocks", "cli", "geoseg.pipeline:run_blocks", "TERM", {"delay": 1.0}),
    ("Ctrl-C in blocks", "cli", "geoseg.pipeline:run_blocks", "INT", {"delay": 1.0, "group": True}),
    ("SIGTERM in COGs", "cli", "geoseg.pipeline:finalise", "TERM", {"delay": 0.05}),
    ("SIGTERM in polygons", "cli", "geoseg.pipeline:vectorise_stage", "TERM", {"delay": 0.1}),
    ("Ctrl-C in polygons", "cli", "geoseg.pipeline:vectorise_stage", "INT", {"delay": 0.1, "group": True}),
    ("flow: SIGTERM in blocks", "flow", "geoseg.pipeline:run_blocks", "TERM", {"delay": 1.0}),
    ("flow: Ctrl-C in polygons", "flow", "geoseg.pipeline:vectorise_stage", "INT", {"delay": 0.1, "group": True}),
    ("kill -9 one Dask worker in blocks", "cli", "geoseg.pipeline:run_blocks", "KILL", {"delay": 1.0, "worker": True}),
    ("kill -9 the run in blocks", "cli1", "geoseg.worker:write_block", "KILL", {"nth": 6}),
    ("kill -9 the run in polygons", "cli1", "geoseg.vector.blocks:polygonise_block", "KILL", {"nth": 4}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=256)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-faults-", dir=ROOT / ".tmp"))
    scene = upsampled_scene(work / "scene.tif", args.factor)
    ckpt = make_tiny_checkpoint(work / "tiny.pt", NC_SCENE)
    opts = {"cli": ("--block-size", args.block_size, "--workers", 2),
            "cli1": ("--block-size", args.block_size, "--workers", 1)}
    config = work / "predict.yaml"
    config.write_text(f"block_size: {args.block_size}\nworkers: 2\n")
    ref = work / "reference"
    base = run(cli("predict", scene, "-c", ckpt, "-o", ref, *opts["cli"]), timeout=600)
    print(f"undisturbed run: {base.seconds:.1f} s, exit {base.returncode}")
    print("| case | exit | stop s | left running | rerun: blocks resumed | same bytes |")
    print("|---|---|---|---|---|---|")
    for i, (name, entry, at, sig, kw) in enumerate(CASES):
        out = work / f"case{i}"
        target = ("flow", scene, ckpt, out, config) if entry == "flow" else ("cli", "predict", scene, "-c", ckpt,
                                                                              "-o", out, *opts[entry])
        hit = run(hooked(at, sig, *target, **kw), timeout=600)
        sent = next((t for line, t in hit.marks.items() if line.startswith("hooked: ")), None)
        stop = f"{hit.seconds - sent:.1f}" if sent is not None else "-"
        rerun = run(cli("predict", scene, "-c", ckpt, "-o", out, *opts["cli" if entry == "flow" else entry]),
                    timeout=600)
        summary = json.loads((out / "summary.json").read_text()) if rerun.returncode == 0 else {}
        same = rerun.returncode == 0 and all(
            (out / f"scene{s}").read_bytes() == (ref / f"scene{s}").read_bytes() for s in OUTPUTS)
        resumed = f"{summary.get('blocks_skipped')} of {summary.get('grid', {}).get('blocks')}" if summary else "-"
        print(f"| {name} | {hit.returncode} | {stop} | {len(hit.left_running())} | {resumed} | {same} |", flush=True)


if __name__ == "__main__":
    main()
