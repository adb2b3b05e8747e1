"""Atomic writes: a file or folder the package writes appears whole or not at all.

Every model, checkpoint, report or export the package writes goes through ``atomic_path``:
the writer fills a temporary sibling (same folder, so the final rename never crosses file
systems; same extension, so Keras still picks the format from it) and only a writer that
returned normally replaces the destination. A failure or Ctrl-C leaves the old file as it was
and no half-written file that looks valid.
"""

import contextlib
import os
import shutil
import tempfile


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_path(path, directory=False):
    """Yields a temporary path to write instead of ``path``; renames it into place on success.

    ``directory=True`` for writers that produce a folder (a SavedModel). The temporary name keeps
    the destination's extension (``.m.keras.tmp123.keras``), because Keras chooses the format by it.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path.rstrip(os.sep))
    ext = "" if directory else os.path.splitext(base)[1]
    handle, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=folder)
    os.close(handle)
    os.remove(tmp)  # the writer creates it (some writers refuse an existing file)
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise FileNotFoundError(f"the writer did not create {path}")
        if directory and os.path.isdir(path):
            # Folders cannot be replaced in one rename: move the old one aside first.
            old = tmp + ".old"
            os.rename(path, old)
            os.rename(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_open(path, mode="w", **kwargs):
    """``open(path, mode)`` whose content replaces ``path`` only when the block completes."""
    if not any(flag in mode for flag in "wx"):
        raise ValueError(f"atomic_open writes a new file; mode {mode!r} does not")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def same_file(a, b):
    """True when two paths name the same existing file or folder (links and relative paths resolved)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
