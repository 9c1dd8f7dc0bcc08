"""The inbox of scenes and the ledger of what was processed: the bookkeeping of a scheduled batch.

A scene is keyed by the SHA-256 of its bytes (of its size and ETag for an object on storage,
:func:`object_key`), of the settings that shape the output and of the
checkpoint (:func:`scene_key`), so it is processed once per model and settings, whatever its file name
or date; a copy delivered twice is skipped. Its outputs go to ``OUT_ROOT/<scene stem>-<key[:12]>/``
(:func:`output_dir`), and a finished ``summary.json`` there is the proof of a result (:func:`is_finished`).

The ledger, ``OUT_ROOT/processed.json``, records per key the scene, its output folder, status and error,
plus a cache of file hashes so unchanged files are not re-read every night. It is replaced atomically
(:func:`write_ledger`); an unreadable one is set aside, never trusted (:func:`read_ledger`).

Everything here is plain Python (no Prefect): ``flows/batch.py`` runs the scenes and publishes
:func:`report_markdown` and :func:`report_table` as artifacts.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from geoseg.atomic import write_text
from geoseg.checkpoint import file_sha256
from geoseg.config import PredictConfig
from geoseg.errors import GeosegError
from geoseg.location import is_url, list_prefix, stem, version
from geoseg.stac import collection_items, is_item_collection, is_stac

#: The ledger file in ``out_root``.
LEDGER = "processed.json"
#: File suffixes taken from an inbox folder (a glob or a list picks any raster).
SCENE_SUFFIXES = (".tif", ".tiff")
#: Hex digits of the key in output folder names.
SHORT_KEY = 12


@dataclass(frozen=True)
class Scene:
    """One scene of the batch and what the inventory decided for it."""

    scene: str
    status: str  # "todo", "skipped" or "failed"
    key: str = ""
    sha256: str = ""
    out_dir: str = ""
    note: str = ""  # why skipped, or the error


# --------------------------------------------------------------------------------------------------
# The inbox: finding scenes and keying them.


def find_scenes(
    inbox: str | Path | Sequence[str | Path], *, exclude: str | Path | None = None
) -> list[Path | str]:
    """The scenes named by ``inbox``: a folder, a glob, a file, a URL, a prefix, an ItemCollection, or a list.

    A folder gives its ``*.tif``/``*.tiff``, an object-storage prefix ending in ``/`` (``s3://b/in/``)
    its ``*.tif``/``*.tiff`` objects, a STAC ItemCollection (``*.json``) its Items' ``self`` links.
    Hidden files (``.name``, e.g. partial copies) and anything under ``exclude`` (the output root) are
    left out; paths that do not exist are kept, so the inventory reports them.
    """
    items = [inbox] if isinstance(inbox, str | Path) else list(inbox)
    found: list[Path] = []
    urls: list[str] = []
    for item in items:
        if is_url(item) and str(item).endswith("/"):
            urls += list_prefix(str(item), SCENE_SUFFIXES)
            continue
        if is_stac(item) and (is_url(item) or Path(item).is_file()) and is_item_collection(item):
            urls += [u for u in collection_items(item) if is_url(u)]
            found += [Path(u) for u in collection_items(item) if not is_url(u)]
            continue
        if is_url(item):
            urls.append(str(item))
            continue
        text = os.path.expanduser(str(item))
        if any(c in text for c in "*?["):
            found += [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
        elif Path(text).is_dir():
            found += sorted(
                p for p in Path(text).iterdir()
                if p.is_file() and p.suffix.lower() in SCENE_SUFFIXES and not p.name.startswith(".")
            )
        else:
            found.append(Path(text))
    skip = Path(exclude).resolve() if exclude else None
    unique: dict[Path, Path] = {}
    for p in found:
        full = p.resolve()
        if p.name.startswith(".") or (skip and full.is_relative_to(skip)):
            continue
        unique.setdefault(full, full)
    return [*unique, *dict.fromkeys(urls)]


def settings_sha256(config: PredictConfig) -> str:
    """SHA-256 of the settings that shape the output (:meth:`PredictConfig.output_settings`)."""
    return hashlib.sha256(json.dumps(config.output_settings(), sort_keys=True).encode()).hexdigest()


def scene_key(scene_sha256: str, settings_hash: str, checkpoint_sha256: str) -> str:
    """The key a scene is processed once under: its bytes, the settings and the model."""
    return hashlib.sha256(f"{scene_sha256}\n{settings_hash}\n{checkpoint_sha256}".encode()).hexdigest()


def output_dir(out_root: str | Path, scene: str | Path, key: str) -> Path:
    """``out_root/<scene stem>-<key[:12]>``."""
    return Path(out_root) / f"{stem(scene)}-{key[:SHORT_KEY]}"


def is_finished(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a finished predict run (its summary.json is written last, atomically)."""
    return (Path(out_dir) / "summary.json").is_file()


# --------------------------------------------------------------------------------------------------
# The ledger.


def read_ledger(out_root: str | Path) -> dict[str, Any]:
    """The ledger of ``out_root``; empty when missing. An unreadable one is set aside, not trusted."""
    path = Path(out_root) / LEDGER
    empty: dict[str, Any] = {"version": 1, "scenes": {}, "files": {}}
    if not path.is_file():
        return empty
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("scenes"), dict):
            raise ValueError("not a geoseg ledger")
    except (ValueError, UnicodeDecodeError):
        aside = path.with_name(f"{LEDGER}.unreadable-{int(time.time())}")
        os.replace(path, aside)
        return empty
    data.setdefault("files", {})
    return data


def write_ledger(out_root: str | Path, ledger: dict[str, Any]) -> Path:
    """Write the ledger atomically (temporary name, then rename) and return its path."""
    return write_text(Path(out_root) / LEDGER, json.dumps(ledger, indent=2, sort_keys=True))


def ledger_entry(row: dict[str, Any]) -> dict[str, Any]:
    """The ledger's record of one scene's outcome (a report row), stamped with the time now."""
    return {
        "scene": row["scene"], "scene_sha256": row["sha256"], "out_dir": row["out_dir"],
        "status": row["status"], "error": row["note"] if row["status"] == "failed" else None,
        "flow_run_id": row.get("flow_run_id"), "outputs": row.get("outputs"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def object_key(url: str) -> str:
    """What stands for an object's bytes in its key: its size and ETag (the store's own content hash).

    Reading a whole object to hash it would download every scene of a bucket every night.
    """
    size, tag = version(url)
    return hashlib.sha256(f"object\n{size}\n{tag}".encode()).hexdigest()


def _sha256_cached(path: Path, files: dict[str, Any]) -> str:
    """SHA-256 of ``path``, reusing the ledger's entry while size and mtime are unchanged."""
    st = path.stat()
    cached = files.get(str(path))
    if cached and cached.get("size") == st.st_size and cached.get("mtime_ns") == st.st_mtime_ns:
        return cached["sha256"]
    sha = file_sha256(path)
    files[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    return sha


# --------------------------------------------------------------------------------------------------
# Planning: what to process.


def plan_batch(
    paths: Sequence[Path | str],
    out_root: Path,
    ledger: dict[str, Any],
    *,
    settings_hash: str,
    checkpoint_sha256: str,
    reprocess: bool = False,
) -> list[Scene]:
    """Hash every scene and decide: todo, skipped (already processed, or a duplicate) or failed (unreadable).

    Updates the ledger's file-hash cache in place.
    """
    scenes: list[Scene] = []
    first: dict[str, str] = {}
    for path in paths:
        if is_url(path):
            try:
                sha = object_key(path)
            except GeosegError as err:
                scenes.append(Scene(path, "failed", note=str(err)))
                continue
        elif not path.is_file():
            what = "is not a file" if path.exists() else "no such file"
            scenes.append(Scene(str(path), "failed", note=f"{path}: {what}. Check the inbox path or glob."))
            continue
        else:
            try:
                sha = _sha256_cached(path, ledger["files"])
            except OSError as err:
                scenes.append(Scene(str(path), "failed", note=f"{path}: cannot read it ({err.strerror or err})."))
                continue
        key = scene_key(sha, settings_hash, checkpoint_sha256)
        entry = ledger["scenes"].get(key, {})
        out = Path(entry["out_dir"]) if entry.get("out_dir") else output_dir(out_root, path, key)
        scene = Scene(str(path), "todo", key=key, sha256=sha, out_dir=str(out))
        if not reprocess and is_finished(out):
            scene = replace(scene, status="skipped", note=f"already processed into {out}")
        elif key in first:
            scene = replace(scene, status="skipped", note=f"same content as {first[key]}")
        first.setdefault(key, str(path))
        scenes.append(scene)
    return scenes


def take_inventory(
    inbox: str | Path | Sequence[str | Path],
    checkpoint: str | Path,
    out_root: str | Path,
    config: PredictConfig,
    *,
    reprocess: bool = False,
) -> tuple[list[Scene], dict[str, Any]]:
    """Find the scenes of ``inbox``, hash them and the checkpoint, and decide which to process.

    Finished outputs the ledger does not know of (e.g. it was lost) are recorded in it as processed.

    Returns:
        The scenes with their decisions, and the ledger (read from ``out_root``, updated, not written).
    """
    root = Path(out_root)
    ledger = read_ledger(root)
    paths = find_scenes(inbox, exclude=root)
    scenes = plan_batch(
        paths, root, ledger, settings_hash=settings_sha256(config), checkpoint_sha256=file_sha256(checkpoint),
        reprocess=reprocess,
    )
    for s in scenes:
        if s.status == "skipped" and s.key not in ledger["scenes"] and is_finished(s.out_dir):
            ledger["scenes"][s.key] = ledger_entry({**asdict(s), "status": "processed", "note": ""})
    return scenes, ledger


# --------------------------------------------------------------------------------------------------
# Reporting: errors, counts, the report.


def error_line(err: BaseException | str | None) -> str:
    """One line for an error: a GeosegError's message as is, anything else with its type."""
    if err is None:
        return "failed (no error message)"
    if isinstance(err, str):
        text = err
    elif isinstance(err, GeosegError):
        text = str(err)
    else:
        text = f"{type(err).__name__}: {err}"
    return " ".join(text.split()) or type(err).__name__


def count_rows(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many scenes were processed, skipped and failed."""
    return {s: sum(r["status"] == s for r in rows) for s in ("processed", "skipped", "failed")}


def counts_line(rows: Sequence[dict[str, Any]]) -> str:
    """``"2 processed, 0 skipped, 1 failed"``."""
    return ", ".join(f"{n} {status}" for status, n in count_rows(rows).items())


def failure_message(rows: Sequence[dict[str, Any]]) -> str | None:
    """One line naming the first failed scene and its error (None when nothing failed)."""
    failed = [r for r in rows if r["status"] == "failed"]
    if not failed:
        return None
    more = f" (and {len(failed) - 1} more; see the batch-report artifact)" if len(failed) > 1 else ""
    first = failed[0]
    return f"{len(failed)} of {len(rows)} scenes failed: {Path(first['scene']).name}: {first['note']}{more}"


def report_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """One table row per scene: scene, status, short key, output folder (unless failed), error (if failed)."""
    return [
        {"scene": r["scene"], "status": r["status"], "key": r["key"][:SHORT_KEY],
         "output": r["out_dir"] if r["status"] != "failed" else "",
         "error": r["note"] if r["status"] == "failed" else ""}
        for r in rows
    ]


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def report_markdown(rows: Sequence[dict[str, Any]], *, out_root: str | Path, ui_url: str | None = None) -> str:
    """The batch report: counts, every scene with its outcome, and the failures with their errors."""
    root = Path(out_root)
    lines = [f"# geoseg batch: {counts_line(rows)}", "", f"Output root: `{_cell(str(root))}`", ""]
    if rows:
        lines += ["| scene | status | output folder / note |", "|---|---|---|"]
    for r in rows:
        out = Path(r["out_dir"]) if r["out_dir"] else None
        where = f"`{out.name}`" if out and out.parent == root else f"`{_cell(str(out))}`"
        detail = {"processed": where, "failed": "see Failures"}.get(r["status"], _cell(r["note"]))
        status = f"**{r['status']}**" if r["status"] == "failed" else r["status"]
        lines.append(f"| `{_cell(Path(r['scene']).name)}` | {status} | {detail} |")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failures", ""]
        for r in failed:
            run = r.get("flow_run_id")
            link = f" ([predict run]({ui_url.rstrip('/')}/runs/flow-run/{run}))" if run and ui_url else ""
            lines += [f"- **{Path(r['scene']).name}**{link}: {' '.join(r['note'].split())}"]
    if not rows:
        lines += ["No scenes found in the inbox."]
    return "\n".join(lines) + "\n"
