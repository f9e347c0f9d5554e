"""atomic_dir: a reader sees the old directory or the new one, also after a crash mid-swap."""

import os

import pytest

from facejax.atomic import atomic_dir, recover_dir


def _write(directory, text):
    with open(os.path.join(directory, "data.txt"), "w") as f:
        f.write(text)


def _read(directory):
    with open(os.path.join(directory, "data.txt")) as f:
        return f.read()


def test_replace_and_failed_write(tmp_path):
    final = str(tmp_path / "index")
    with atomic_dir(final) as tmp:
        _write(tmp, "one")
    with atomic_dir(final) as tmp:
        _write(tmp, "two")
    assert _read(final) == "two"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        _write(tmp, "three")
        raise RuntimeError("interrupted")
    assert _read(final) == "two" and sorted(os.listdir(tmp_path)) == ["index"]


def test_a_crash_between_the_two_renames_leaves_the_old_copy(tmp_path):
    final = str(tmp_path / "index")
    with atomic_dir(final) as tmp:
        _write(tmp, "old")
    # What atomic_dir leaves when killed after moving `final` aside, before the new one is in
    # place: the old copy under a hidden name and a complete temporary folder.
    os.rename(final, str(tmp_path / ".index.old-abc123"))
    os.makedirs(tmp_path / ".index.tmp-def456")
    _write(str(tmp_path / ".index.tmp-def456"), "new")
    assert not recover_dir(str(tmp_path / "other"))   # nothing to do for another name
    assert recover_dir(final) and _read(final) == "old"
    assert not recover_dir(final)                     # in place: nothing to do
    # The next write recovers first as well.
    os.rename(final, str(tmp_path / ".index.old-xyz"))
    with atomic_dir(final) as tmp:
        _write(tmp, "next")
    assert _read(final) == "next"
    assert not any(n.startswith(".index.old-") for n in os.listdir(tmp_path))
