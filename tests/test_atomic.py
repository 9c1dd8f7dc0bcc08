"""atomic_write and run_lock, in-process: what a reader can see, what is left after a failure."""

import errno
import json
import os

import pytest

from geoseg.atomic import PARTIAL, atomic_write, remove_partials, write_error, write_text
from geoseg.errors import OutputExistsError, OutputLockedError, OutputWriteError
from geoseg.runlock import LOCK_NAME, check_unlocked, run_lock


def test_output_appears_only_when_complete(tmp_path):
    out = tmp_path / "a.json"
    with atomic_write(out) as tmp:
        tmp.write_text("half")
        assert not out.exists() and tmp.name.startswith(".a.") and PARTIAL in tmp.name and tmp.suffix == ".json"
    assert out.read_text() == "half" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_failed_write_leaves_the_old_output_and_no_partial(tmp_path):
    out = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError, match="boom"), atomic_write(out) as tmp:
        tmp.write_text("new")
        raise RuntimeError("boom")
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_sidecars_travel_with_the_file_and_stale_ones_go(tmp_path):
    def sidecars(p):
        return [p.with_suffix(".dbf"), p.with_suffix(".qix")]

    (tmp_path / "a.qix").write_text("stale index")
    with atomic_write(tmp_path / "a.shp", sidecars=sidecars) as tmp:
        tmp.write_text("shapes")
        tmp.with_suffix(".dbf").write_text("table")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dbf", "a.shp"]


def test_refuses_to_overwrite_unless_asked(tmp_path):
    out = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(OutputExistsError, match="--overwrite"), atomic_write(out, overwrite=False):
        pass


def test_write_errors_say_what_to_do(tmp_path):
    full = write_error(tmp_path / "x.tif", OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(full, OutputWriteError) and isinstance(full, OSError)
    assert str(full).startswith(f"{tmp_path / 'x.tif'}: cannot write (No space left on device)")
    assert "disk is full" in str(full)
    assert "not writable" in str(write_error(tmp_path, PermissionError(errno.EACCES, "Permission denied")))


def test_second_holder_is_refused_naming_the_first(tmp_path):
    with run_lock(tmp_path) as lock:
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and info["host"] == os.uname().nodename
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()} on "):
            check_unlocked(tmp_path)
        with pytest.raises(OutputLockedError, match="Wait for it to finish"), run_lock(tmp_path):
            pass
    check_unlocked(tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_lock_is_taken_over_and_partials_cleared(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 1, "host": "gone", "started": 0}))
    (tmp_path / f".x_classes.abcd{PARTIAL}.tif").write_text("killed mid-write")
    (tmp_path / f".x_polygons.efgh{PARTIAL}").mkdir()
    (tmp_path / "keep.tif").write_text("a result")
    with run_lock(tmp_path):
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME, "keep.tif"]
    assert remove_partials(tmp_path) == []
