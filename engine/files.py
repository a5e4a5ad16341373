"""File helpers: atomic writes and content hashes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from glyph_engine.errors import GlyphEngineError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it over `path` only on success.

    A crash or exception leaves `path` as it was and removes the temporary file, so readers
    never see a half-written output.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(0o666 & ~current_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_staging_dir(target: Path, suffix: str) -> Path:
    """An empty hidden folder beside `target`, with the usual permissions (not mkdtemp's 0700)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent))
    staging.chmod(0o777 & ~current_umask())
    return staging


def check_writable_file(path: str | os.PathLike) -> Path:
    """Fails early, before minutes of work, if `path` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise GlyphEngineError(f"output path {path} is a folder; give a file name such as {path / 'glyphs.png'}.")
    if not parent.is_dir():
        raise GlyphEngineError(f"cannot write {path}: folder {parent} does not exist; create it first.")
    # A real probe rather than os.access: root passes access checks on read-only mounts.
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as e:
        raise GlyphEngineError(f"cannot write {path}: {e.strerror}; choose another output path.") from None
    os.close(fd)
    os.unlink(probe)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
