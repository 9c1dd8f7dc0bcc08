"""The inbox of scenes and the ledger (geoseg.inbox): plain functions, no Prefect, no server."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from geoseg.config import POLYGONS_ONLY, RUNTIME_ONLY, BatchCluster, PredictConfig
from geoseg.errors import BandMismatchError
from geoseg.inbox import (
    LEDGER,
    Scene,
    count_rows,
    counts_line,
    error_line,
    failure_message,
    find_scenes,
    is_finished,
    ledger_entry,
    output_dir,
    plan_batch,
    read_ledger,
    report_markdown,
    report_table,
    scene_key,
    settings_sha256,
    take_inventory,
    write_ledger,
)

# --------------------------------------------------------------------------------------------------
# Moved from test_batch_flow.py.


def test_find_scenes_folder_glob_list(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("a.tif", "b.TIFF", ".partial.tif", "notes.txt", "sub/c.tif"):
        (tmp_path / "in" / name).write_bytes(b"x")
    (tmp_path / "in" / "out").mkdir()
    (tmp_path / "in" / "out" / "a_classes.tif").write_bytes(b"x")
    folder = find_scenes(tmp_path / "in")
    assert [p.name for p in folder] == ["a.tif", "b.TIFF"]
    globbed = find_scenes(str(tmp_path / "in" / "**" / "*.tif"), exclude=tmp_path / "in" / "out")
    assert sorted(p.name for p in globbed) == ["a.tif", "c.tif"]
    listed = find_scenes([tmp_path / "in" / "a.tif", str(tmp_path / "in" / "a.tif"), tmp_path / "missing.tif"])
    assert [p.name for p in listed] == ["a.tif", "missing.tif"]


def test_key_ignores_runtime_settings_only():
    base = settings_sha256(PredictConfig(block_size=256))
    assert settings_sha256(PredictConfig(block_size=256, workers=3, scheduler="tcp://x:8786")) == base
    assert settings_sha256(PredictConfig(block_size=512)) != base
    assert scene_key("a", base, "c") != scene_key("a", base, "d") != scene_key("b", base, "c")


def test_plan_batch_skips_finished_and_duplicates_retries_failed(tmp_path):
    scenes = []
    for name, content in (("one.tif", b"1"), ("two.tif", b"2"), ("copy_of_one.tif", b"1"), ("three.tif", b"3")):
        scenes.append(tmp_path / name)
        scenes[-1].write_bytes(content)
    out = tmp_path / "out"
    ledger = read_ledger(out)
    first = plan_batch(scenes + [tmp_path / "gone.tif"], out, ledger, settings_hash="s", checkpoint_sha256="c")
    assert [s.status for s in first] == ["todo", "todo", "skipped", "todo", "failed"]
    assert first[2].note == f"same content as {scenes[0]}" and first[2].key == first[0].key
    assert "gone.tif: no such file" in first[4].note
    Path(first[0].out_dir).mkdir(parents=True)
    (Path(first[0].out_dir) / "summary.json").write_text("{}")
    ledger["scenes"][first[1].key] = {"status": "failed", "out_dir": first[1].out_dir}
    write_ledger(out, ledger)
    again = plan_batch(scenes, out, read_ledger(out), settings_hash="s", checkpoint_sha256="c")
    assert [s.status for s in again] == ["skipped", "todo", "skipped", "todo"]
    assert again[0].note == f"already processed into {first[0].out_dir}"
    forced = plan_batch(scenes[:1], out, ledger, settings_hash="s", checkpoint_sha256="c", reprocess=True)
    assert forced[0].status == "todo"
    other_model = plan_batch(scenes[:1], out, ledger, settings_hash="s", checkpoint_sha256="other")
    assert other_model[0].status == "todo" and other_model[0].out_dir != first[0].out_dir


def test_ledger_hash_cache_and_unreadable_ledger(tmp_path):
    scene = tmp_path / "s.tif"
    scene.write_bytes(b"abc")
    ledger = read_ledger(tmp_path)
    [planned] = plan_batch([scene], tmp_path, ledger, settings_hash="s", checkpoint_sha256="c")
    assert ledger["files"][str(scene)]["sha256"] == planned.sha256
    ledger["files"][str(scene)]["sha256"] = "cached"  # unchanged size and mtime: the cache is trusted
    [cached] = plan_batch([scene], tmp_path, ledger, settings_hash="s", checkpoint_sha256="c")
    assert cached.sha256 == "cached"
    (tmp_path / LEDGER).write_text("{not json")
    assert read_ledger(tmp_path)["scenes"] == {}
    assert list(tmp_path.glob(f"{LEDGER}.unreadable-*"))


def test_report_and_error_lines():
    rows = [
        asdict(Scene("/in/a.tif", "processed", key="k" * 64, out_dir="/out/a-kkk")),
        asdict(Scene("/in/d.tif", "skipped", key="k" * 64, out_dir="/out/a-kkk", note="same content as /in/a.tif")),
        {**asdict(Scene("/in/b|c.tif", "failed", note="bad | pipe\nsecond line")), "flow_run_id": "f1"},
    ]
    md = report_markdown(rows, out_root="/out", ui_url="http://127.0.0.1:4200")
    assert md.startswith("# geoseg batch: 1 processed, 1 skipped, 1 failed\n")
    assert "| `a.tif` | processed | `a-kkk` |" in md
    assert "| `d.tif` | skipped | same content as /in/a.tif |" in md
    assert "| `b\\|c.tif` | **failed** | see Failures |" in md
    assert "- **b|c.tif** ([predict run](http://127.0.0.1:4200/runs/flow-run/f1)): bad | pipe second line" in md
    assert "No scenes found" in report_markdown([], out_root="/out")
    assert error_line(BandMismatchError("x.tif: 4 bands,\n  model wants 6")) == "x.tif: 4 bands, model wants 6"
    assert error_line(KeyError("boom")) == "KeyError: 'boom'"


# --------------------------------------------------------------------------------------------------
# Finding scenes.


def test_find_scenes_leaves_out_hidden_files_and_the_output_root(tmp_path):
    inbox = tmp_path / "in"
    (inbox / "out" / "scene-0123456789ab").mkdir(parents=True)
    for name in ("a.tif", "z.tiff", ".a.tif.partial.tif", ".hidden.tif", "out/x.tif", "out/scene-0123456789ab/y.tif"):
        (inbox / name).write_bytes(b"x")
    (inbox / "folder.tif").mkdir()  # a folder named like a scene is not a scene
    assert [p.name for p in find_scenes(inbox, exclude=inbox / "out")] == ["a.tif", "z.tiff"]
    globbed = find_scenes(str(inbox / "**" / "*.tif"), exclude=inbox / "out")
    assert [p.name for p in globbed] == ["a.tif"]
    everything = find_scenes(str(inbox / "**" / "*.tif"))
    assert sorted(p.name for p in everything) == ["a.tif", "x.tif", "y.tif"]  # globs skip hidden names too
    listed = find_scenes([inbox / ".hidden.tif", inbox / "out" / "x.tif", inbox / "a.tif"], exclude=inbox / "out")
    assert listed == [(inbox / "a.tif").resolve()]


def test_find_scenes_returns_absolute_unique_paths_in_order(tmp_path, monkeypatch):
    for name in ("b.tif", "a.tif"):
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    found = find_scenes(["b.tif", tmp_path / "a.tif", "./b.tif", str(tmp_path / "*.tif")])
    assert found == [tmp_path.resolve() / "b.tif", tmp_path.resolve() / "a.tif"]
    assert all(p.is_absolute() for p in found)
    assert find_scenes(tmp_path / "empty-glob-*.tif") == []


# --------------------------------------------------------------------------------------------------
# Keys and output folders.


def test_key_changes_with_bytes_settings_and_checkpoint_not_workers_or_scheduler(tmp_path):
    scene = tmp_path / "s.tif"
    scene.write_bytes(b"scene v1")
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"model v1")
    out = tmp_path / "out"

    def key(config: PredictConfig) -> str:
        [planned] = take_inventory(scene, ckpt, out, config)[0]
        return planned.key

    base = key(PredictConfig(block_size=256))
    assert len(base) == 64 and key(PredictConfig(block_size=256)) == base
    assert key(PredictConfig(block_size=256, workers=4, scheduler="tcp://10.0.0.5:8786")) == base
    assert key(PredictConfig(block_size=512)) != base
    ckpt.write_bytes(b"model v2")
    other_model = key(PredictConfig(block_size=256))
    assert other_model != base
    scene.write_bytes(b"scene v2")
    assert key(PredictConfig(block_size=256)) not in (base, other_model)


def test_output_settings_drop_runtime_only_options():
    settings = PredictConfig(block_size=256, workers=3, scheduler="tcp://x:8786").output_settings()
    assert "workers" not in settings and "scheduler" not in settings
    assert settings["block_size"] == 256
    json.dumps(settings)  # JSON-ready, as the predict subflow parameter


def test_scene_keys_and_store_fingerprints_follow_one_rule(tiny_checkpoint, tmp_path):
    """Every setting but workers/scheduler changes the batch key; all but the polygon ones the store's."""
    from conftest import NC_SCENE

    from geoseg.pipeline import plan_run

    base = PredictConfig(block_size=256)
    changes = {"batch_size": 3, "margin": 16, "threads": 2, "flip": True, "scales": (1.0, 1.5), "probabilities": True,
               "tile_size": 128, "min_area": 900.0, "simplify": 15.0, "vector_format": "shp",
               "vectorize": False, "workers": 2, "scheduler": "tcp://x:8786",
               "cluster": BatchCluster(kind="slurm", jobs=2)}
    assert set(changes) | {"block_size", "device", "bands"} == set(PredictConfig.model_fields)
    base_print = plan_run(NC_SCENE, tiny_checkpoint, tmp_path / "a", config=base).fingerprint
    for name, value in changes.items():
        other = base.model_copy(update={name: value})
        assert (settings_sha256(other) != settings_sha256(base)) == (name not in RUNTIME_ONLY), name
        fingerprint = plan_run(NC_SCENE, tiny_checkpoint, tmp_path / "a", config=other).fingerprint
        assert (fingerprint != base_print) == (name not in RUNTIME_ONLY | POLYGONS_ONLY), name


def test_scene_key_and_output_dir_values():
    assert scene_key("a", "b", "c") == hashlib.sha256(b"a\nb\nc").hexdigest()
    assert scene_key("a", "b", "c") != scene_key("a", "c", "b")
    assert output_dir("/out", "/in/scene.v2.tif", "0123456789abcdef") == Path("/out/scene.v2-0123456789ab")


def test_is_finished_needs_summary_json(tmp_path):
    assert not is_finished(tmp_path / "nope")
    assert not is_finished(tmp_path)
    (tmp_path / "summary.json").mkdir()
    assert not is_finished(tmp_path)  # a folder of that name is no proof
    (tmp_path / "summary.json").rmdir()
    (tmp_path / "summary.json").write_text("{}")
    assert is_finished(tmp_path)


# --------------------------------------------------------------------------------------------------
# The ledger.


def test_ledger_written_atomically_and_read_back(tmp_path):
    out = tmp_path / "out"
    assert read_ledger(out) == {"version": 1, "scenes": {}, "files": {}}
    ledger = read_ledger(out)
    ledger["scenes"]["k1"] = {"scene": "/in/a.tif", "status": "processed", "out_dir": "/out/a-k1"}
    path = write_ledger(out, ledger)  # creates out_root
    assert path == out / LEDGER
    assert read_ledger(out) == ledger
    assert json.loads(path.read_text()) == ledger
    assert sorted(p.name for p in out.iterdir()) == [LEDGER]  # no partial file left behind
    ledger["scenes"]["k2"] = {"scene": "/in/b.tif", "status": "failed", "out_dir": "/out/b-k2"}
    write_ledger(out, ledger)
    assert set(read_ledger(out)["scenes"]) == {"k1", "k2"}


def test_ledger_interrupted_write_keeps_the_previous_one(tmp_path, monkeypatch):
    write_ledger(tmp_path, {"version": 1, "scenes": {"old": {}}, "files": {}})
    before = (tmp_path / LEDGER).read_text()

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_ledger(tmp_path, {"version": 1, "scenes": {"new": {}}, "files": {}})
    monkeypatch.undo()
    assert (tmp_path / LEDGER).read_text() == before
    assert set(read_ledger(tmp_path)["scenes"]) == {"old"}


def test_read_ledger_sets_aside_a_foreign_json_and_fills_in_files(tmp_path):
    (tmp_path / LEDGER).write_text(json.dumps(["not", "a", "ledger"]))
    assert read_ledger(tmp_path)["scenes"] == {}
    assert not (tmp_path / LEDGER).exists() and len(list(tmp_path.glob(f"{LEDGER}.unreadable-*"))) == 1
    (tmp_path / LEDGER).write_text(json.dumps({"version": 1, "scenes": {"k": {}}}))
    assert read_ledger(tmp_path) == {"version": 1, "scenes": {"k": {}}, "files": {}}


def test_ledger_entry_records_the_outcome():
    row = {**asdict(Scene("/in/a.tif", "failed", key="k", sha256="s", out_dir="/out/a-k", note="bad")),
           "flow_run_id": "f1"}
    entry = ledger_entry(row)
    assert {k: entry[k] for k in ("scene", "scene_sha256", "out_dir", "status", "error", "flow_run_id", "outputs")} == {
        "scene": "/in/a.tif", "scene_sha256": "s", "out_dir": "/out/a-k", "status": "failed", "error": "bad",
        "flow_run_id": "f1", "outputs": None}
    assert entry["finished"].endswith("+00:00")
    assert ledger_entry({**row, "status": "processed", "outputs": {"x": 1}})["error"] is None


# --------------------------------------------------------------------------------------------------
# Skipping what was processed.


def test_inventory_skips_a_finished_scene_even_with_the_ledger_lost(tmp_path):
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    (inbox / "a.tif").write_bytes(b"a")
    (inbox / "b.tif").write_bytes(b"b")
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"model")
    config = PredictConfig()
    scenes, ledger = take_inventory(inbox, ckpt, out, config)
    assert [(Path(s.scene).name, s.status) for s in scenes] == [("a.tif", "todo"), ("b.tif", "todo")]
    assert ledger["scenes"] == {} and set(ledger["files"]) == {str(p.resolve()) for p in inbox.iterdir()}
    a = scenes[0]
    assert Path(a.out_dir) == output_dir(out, "a.tif", a.key)
    Path(a.out_dir).mkdir(parents=True)
    (Path(a.out_dir) / "summary.json").write_text("{}")  # a finished result; no ledger was written

    again, ledger = take_inventory(inbox, ckpt, out, config)
    assert [s.status for s in again] == ["skipped", "todo"]
    assert again[0].note == f"already processed into {a.out_dir}"
    assert ledger["scenes"][a.key]["status"] == "processed"  # the finished output is adopted
    assert ledger["scenes"][a.key]["out_dir"] == a.out_dir

    forced, _ = take_inventory(inbox, ckpt, out, config, reprocess=True)
    assert [s.status for s in forced] == ["todo", "todo"]
    ckpt.write_bytes(b"other model")
    new_model, _ = take_inventory(inbox, ckpt, out, config)
    assert [s.status for s in new_model] == ["todo", "todo"]


def test_plan_uses_the_ledger_out_dir_and_retries_failed_scenes(tmp_path):
    scene = tmp_path / "renamed.tif"
    scene.write_bytes(b"content")
    ledger = read_ledger(tmp_path / "out")
    [first] = plan_batch([scene], tmp_path / "out", ledger, settings_hash="s", checkpoint_sha256="c")
    elsewhere = tmp_path / "out" / "original-name"
    ledger["scenes"][first.key] = {"status": "failed", "out_dir": str(elsewhere)}
    [retry] = plan_batch([scene], tmp_path / "out", ledger, settings_hash="s", checkpoint_sha256="c")
    assert (retry.status, retry.out_dir) == ("todo", str(elsewhere))
    elsewhere.mkdir(parents=True)
    (elsewhere / "summary.json").write_text("{}")
    [done] = plan_batch([scene], tmp_path / "out", ledger, settings_hash="s", checkpoint_sha256="c")
    assert (done.status, done.note) == ("skipped", f"already processed into {elsewhere}")


def test_plan_reports_a_folder_given_as_a_scene(tmp_path):
    [s] = plan_batch([tmp_path], tmp_path / "out", read_ledger(tmp_path / "out"), settings_hash="s",
                     checkpoint_sha256="c")
    assert s.status == "failed" and s.note == f"{tmp_path}: is not a file. Check the inbox path or glob."


# --------------------------------------------------------------------------------------------------
# Counts, failures and the report table.


ROWS = [
    {**asdict(Scene("/in/a.tif", "processed", key="a" * 64, out_dir="/out/a-aaa")), "flow_run_id": "f0"},
    asdict(Scene("/in/b.tif", "failed", key="b" * 64, out_dir="/out/b-bbb", note="b.tif: not a raster")),
    asdict(Scene("/in/c.tif", "skipped", key="c" * 64, out_dir="/out/c-ccc", note="already processed")),
    asdict(Scene("/in/d.tif", "failed", note="/in/d.tif: no such file")),
]


def test_counts_and_failure_message():
    assert count_rows(ROWS) == {"processed": 1, "skipped": 1, "failed": 2}
    assert counts_line(ROWS) == "1 processed, 1 skipped, 2 failed"
    assert counts_line([]) == "0 processed, 0 skipped, 0 failed"
    assert failure_message(ROWS) == (
        "2 of 4 scenes failed: b.tif: b.tif: not a raster (and 1 more; see the batch-report artifact)")
    assert failure_message(ROWS[:2]) == "1 of 2 scenes failed: b.tif: b.tif: not a raster"
    assert failure_message([ROWS[0], ROWS[2]]) is None


def test_report_table_rows():
    assert report_table(ROWS) == [
        {"scene": "/in/a.tif", "status": "processed", "key": "a" * 12, "output": "/out/a-aaa", "error": ""},
        {"scene": "/in/b.tif", "status": "failed", "key": "b" * 12, "output": "", "error": "b.tif: not a raster"},
        {"scene": "/in/c.tif", "status": "skipped", "key": "c" * 12, "output": "/out/c-ccc", "error": ""},
        {"scene": "/in/d.tif", "status": "failed", "key": "", "output": "", "error": "/in/d.tif: no such file"},
    ]


def test_error_line_for_empty_and_missing_errors():
    assert error_line(None) == "failed (no error message)"
    assert error_line("  two\n lines ") == "two lines"
    assert error_line(RuntimeError()) == "RuntimeError:"
