"""bcjax.files: the one atomic writer every output file goes through."""

import json
import os
import stat

import numpy as np
import pytest

from bcjax import files


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_writes_json_text_and_arrays(tmp_path):
    files.write_json({"a": 1, "p": tmp_path}, tmp_path / "d" / "x.json", default=str)
    assert json.loads((tmp_path / "d" / "x.json").read_text()) == {"a": 1, "p": str(tmp_path)}
    files.write_text("hello\n", tmp_path / "t.txt")
    assert (tmp_path / "t.txt").read_text() == "hello\n"
    files.save_npz(tmp_path / "a.npz", x=np.arange(3))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["x"], np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "d", "t.txt"]  # no temp left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "r.json"
    files.write_json({"old": True}, path)
    with pytest.raises(TypeError):
        files.write_json({"new": object()}, path)  # not serialisable, fails mid-write
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_new_files_get_the_umask_mode_and_replaced_files_keep_theirs(tmp_path):
    old = os.umask(0o022)
    try:
        files.write_text("x", tmp_path / "new.txt")
        assert _mode(tmp_path / "new.txt") == 0o644  # not mkstemp's 0600
        (tmp_path / "kept.txt").write_text("a")
        os.chmod(tmp_path / "kept.txt", 0o640)
        files.write_text("b", tmp_path / "kept.txt")
        assert _mode(tmp_path / "kept.txt") == 0o640
    finally:
        os.umask(old)


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "set"
    with pytest.raises(RuntimeError):
        with files.atomic_dir(target) as tmp:
            (tmp / "a").write_text("1")
            raise RuntimeError("killed half way")
    assert list(tmp_path.iterdir()) == []
    with files.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with files.atomic_dir(target) as tmp:  # lost a race: the existing folder stays
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with files.atomic_dir(target, replace=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["set"]
