"""n2uq_tf._io: writes that replace their destination only when they complete."""

import os

import pytest

from n2uq_tf import _io


def test_atomic_open_replaces_on_success_and_keeps_old_on_failure(tmp_path):
    path = tmp_path / "report.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with _io.atomic_open(path) as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.txt"]          # no temporary left behind
    with _io.atomic_open(path) as f:
        f.write("new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["report.txt"]


def test_atomic_path_keeps_the_extension_and_handles_folders(tmp_path):
    target = tmp_path / "m.keras"
    with _io.atomic_path(target) as tmp:
        assert tmp.endswith(".keras") and os.path.dirname(tmp) == str(tmp_path)
        assert not os.path.exists(tmp)
        with open(tmp, "w") as f:
            f.write("x")
    assert target.read_text() == "x"

    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "old_file").write_text("old")
    with _io.atomic_path(folder, directory=True) as tmp:
        os.makedirs(tmp)
        with open(os.path.join(tmp, "new_file"), "w") as f:
            f.write("new")
    assert sorted(os.listdir(folder)) == ["new_file"]
    assert sorted(os.listdir(tmp_path)) == ["m.keras", "saved"]


def test_a_writer_that_writes_nothing_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="did not create"):
        with _io.atomic_path(tmp_path / "m.h5"):
            pass
    assert os.listdir(tmp_path) == []


def test_same_file(tmp_path):
    a = tmp_path / "a"
    a.write_text("")
    os.symlink(a, tmp_path / "b")
    assert _io.same_file(a, tmp_path / "b")
    assert _io.same_file(str(a), os.path.relpath(a))
    assert not _io.same_file(a, tmp_path / "missing")
