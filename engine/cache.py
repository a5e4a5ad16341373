"""The per-user artifact cache: what the first run builds for a model on this CPU (compiled
OpenVINO models, int8 calibrations), kept so that later runs start at once.

Layout: ``ROOT/NAME/`` holds an entry's files and ``entry.json`` (its key and each file's size
and sha256), where NAME is ``KIND-PRECISION-DIGEST`` and DIGEST hashes the whole key: model
content, kind, precision, the library versions that shape the artifact and the CPU's
features. An entry appears by renaming a finished staging folder, so readers never see half
of one; it never changes afterwards.

Two processes: the builder of an entry holds an flock on ``ROOT/.locks/NAME``; a second
process waits for it and then reads what it built. Reading an entry marks it used (its
folder's mtime), so that `prune` can bound a kind that has many entries by removing the least
recently used. A damaged entry (a file that fails its
hash, or an entry path that is not a folder) is removed and rebuilt, never used; a symlink is
removed itself, never followed. Where the cache cannot be written (read-only, full,
no permission), the artifact is built in memory for this run, with one warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from glyph_engine.files import FOLDER, REGULAR_FILE, kind_of, read_regular_file

logger = logging.getLogger(__name__)

ENV_VAR = "GLYPH_ENGINE_CACHE"
ENTRY = "entry.json"
FORMAT = 1


def default_cache_dir() -> Path:
    """$GLYPH_ENGINE_CACHE, else $XDG_CACHE_HOME/glyph-engine, else ~/.cache/glyph-engine."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache") / "glyph-engine"


@dataclass(frozen=True)
class ArtifactKey:
    """Everything an artifact depends on: any change gives another entry."""

    model_sha256: str
    kind: str  # e.g. "openvino"
    precision: str
    versions: tuple[tuple[str, str], ...]  # (library, version) of what builds and reads it
    cpu_flags: tuple[str, ...]  # compiled code and calibrations are specific to the CPU's units

    @property
    def name(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return f"{self.kind}-{self.precision}-{digest[:24]}"


@dataclass
class Artifact:
    files: dict[str, bytes]  # file name -> contents
    meta: dict[str, Any] = field(default_factory=dict)  # what the builder recorded (JSON values)
    source: str = "memory"  # "cache" when read from an entry, "built" when just built


class ArtifactCache:
    """`root` None: nothing is kept (every run builds in memory)."""

    def __init__(self, root: Path | None):
        self.root = root
        self._warned = False

    def get(self, key: ArtifactKey, build: Callable[[], Artifact]) -> Artifact:
        """The artifact for `key`: read from the cache, else built (and stored when possible)."""
        if self.root is None:
            return _built(build())
        lock = self._lock(key.name)  # None: the cache cannot be written; it may still be read
        try:
            found = self._read(key, remove_damaged=lock is not None)
            if found is not None:
                return found
            artifact = _built(build())
            if lock is not None:
                try:
                    self._store(key, artifact)
                except OSError as e:  # full, or turned read-only meanwhile
                    self._cannot_write(e)
            return artifact
        finally:
            if lock is not None:
                os.close(lock)  # releases the lock; a killed holder's lock goes with its process

    def peek(self, key: ArtifactKey) -> dict[str, Any] | None:
        """The recorded meta of a sound entry for `key`, without building anything."""
        if self.root is None:
            return None
        found = self._read(key, remove_damaged=False, quiet=True)
        return found.meta if found is not None else None

    def prune(self, prefix: str, keep: int) -> None:
        """Removes the least recently used entries whose names start with `prefix` beyond the
        `keep` most recent. One being built (its lock held) is left alone; a process reading
        one as it goes finds it missing and builds it again."""
        if self.root is None:
            return
        entries = []
        with contextlib.suppress(OSError):
            for path in self.root.iterdir():
                if path.name.startswith(prefix) and kind_of(path) == FOLDER:
                    with contextlib.suppress(OSError):
                        entries.append((path.stat().st_mtime, path))
        entries.sort(reverse=True)
        for _, path in entries[keep:]:
            try:
                fd = _open_lock_file(self.root / ".locks" / path.name)
            except OSError:
                return  # the cache cannot be written: nothing can be removed either
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                _remove(path)
            except BlockingIOError:
                pass
            finally:
                os.close(fd)

    def _cannot_write(self, error: OSError) -> None:
        if not self._warned:  # one line per run, however many artifacts
            logger.warning(
                "cannot write the artifact cache %s (%s); building in memory for this run. Set %s or "
                "--cache-dir to a writable folder to keep the build.",
                self.root,
                error.strerror or error,
                ENV_VAR,
            )
            self._warned = True

    def _lock(self, name: str) -> int | None:
        """Holds the build lock of entry `name` (a descriptor to close), or None with a warning
        when the cache cannot be written."""
        path = self.root / ".locks" / name
        while True:
            try:
                fd = _open_lock_file(path)
            except OSError as e:
                self._cannot_write(e)
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.warning("waiting for another glyph-engine process that is building %s", name)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _is_lock_file(fd, path):
                return fd
            os.close(fd)  # another process replaced what it found there meanwhile: lock its file

    def _read(self, key: ArtifactKey, remove_damaged: bool = True, quiet: bool = False) -> Artifact | None:
        folder = self.root / key.name
        kind = kind_of(folder)
        if kind is None:
            return None
        try:
            if kind != FOLDER:  # entries are only ever made by renaming a folder
                raise ValueError(f"it is {kind}, not a folder")
            artifact = _read_entry(folder, key)
        except (OSError, ValueError) as e:
            if not quiet:
                logger.warning(
                    "cache entry %s is damaged (%s); %s",
                    folder,
                    e,
                    "rebuilding it" if remove_damaged else "not using it",
                )
            if remove_damaged:
                _remove(folder)
            return None
        with contextlib.suppress(OSError):  # marked used, for `prune`; a read-only cache is still read
            os.utime(folder)
        return artifact

    def _store(self, key: ArtifactKey, artifact: Artifact) -> None:
        """Writes the entry in a staging folder and renames it into place (under the key's lock,
        so a staging folder found here is a killed build's leftover)."""
        final = self.root / key.name
        staging = self.root / f".{key.name}.partial"
        _remove(staging)
        try:
            staging.mkdir()
            entry = {"format": FORMAT, "key": asdict(key), "meta": artifact.meta, "files": {}}
            for name, data in artifact.files.items():
                (staging / name).write_bytes(data)
                entry["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            (staging / ENTRY).write_text(json.dumps(entry, indent=1))
            _remove(final)  # a damaged entry removed but still there
            os.rename(staging, final)
        finally:
            _remove(staging)


def _remove(path: Path) -> None:
    """Removes whatever is at `path`: a folder with its contents, anything else itself (a
    symlink, never what it points to). Failures are left for the next write to report."""
    if kind_of(path) == FOLDER:
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _open_lock_file(path: Path) -> int:
    """A descriptor on the lock file `path`, creating it and its folder when missing.

    Whatever else is there, at `path` or at its folder (a symlink, FIFO, folder: damage, never
    made here), is replaced rather than followed, so locking never writes outside the cache.
    """
    if kind_of(path.parent) not in (None, FOLDER):
        _remove(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind_of(path) not in (None, REGULAR_FILE):
        _remove(path)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)


def _is_lock_file(fd: int, path: Path) -> bool:
    """Whether the locked `fd` is still the regular file at `path`: two processes that found
    damage there may each have replaced it, and only the lock on the file that stays counts."""
    try:
        here = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return stat.S_ISREG(mine.st_mode) and os.path.samestat(mine, here)


def _built(artifact: Artifact) -> Artifact:
    artifact.source = "built"
    return artifact


def _read_entry(folder: Path, key: ArtifactKey) -> Artifact:
    """The entry's files, each checked against its recorded size and sha256; ValueError names
    the first thing wrong."""
    try:
        entry = json.loads(_file_bytes(folder / ENTRY))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable {ENTRY}: {e}") from None
    if (
        not isinstance(entry, dict)
        or entry.get("format") != FORMAT
        or entry.get("key") != json.loads(json.dumps(asdict(key)))
    ):
        raise ValueError(f"{ENTRY} does not describe this entry")
    files, meta = entry.get("files"), entry.get("meta")
    if not isinstance(files, dict) or not files or not isinstance(meta, dict):
        raise ValueError(f"{ENTRY} lists no files")
    contents = {}
    for name, recorded in files.items():
        if not isinstance(recorded, dict) or Path(name).name != name:
            raise ValueError(f"{ENTRY} has a bad record for {name!r}")
        data = _file_bytes(folder / name)
        if len(data) != recorded.get("bytes") or hashlib.sha256(data).hexdigest() != recorded.get("sha256"):
            raise ValueError(f"{name} does not match its recorded sha256")
        contents[name] = data
    return Artifact(files=contents, meta=meta, source="cache")


def _file_bytes(path: Path) -> bytes:
    """The contents of `path` if it is a regular file: reading a FIFO would wait forever, and a
    symlink would read from outside the entry."""
    data = read_regular_file(path)
    if data is None:
        raise OSError(f"{path.name} is {kind_of(path) or 'missing'}, not a regular file")
    return data
