"""The per-user artifact cache: what the first run builds for a model on this CPU (compiled
OpenVINO models, int8 calibrations), kept so that later runs start at once.

Layout: ``ROOT/NAME/`` holds an entry's files and ``entry.json`` (its key and each file's size
and sha256), where NAME is ``KIND-PRECISION-DIGEST`` and DIGEST hashes the whole key: model
content, kind, precision, the library versions that shape the artifact and the CPU's
features. An entry appears by renaming a finished staging folder, so readers never see half
of one; it never changes afterwards.

Two processes: the builder of an entry holds an flock on ``ROOT/.locks/NAME``; a second
process waits for it and then reads what it built. A damaged entry (a file that fails its
hash) is removed and rebuilt, never used. Where the cache cannot be written (read-only, full,
no permission), the artifact is built in memory for this run, with one warning.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
        try:
            locks = self.root / ".locks"
            locks.mkdir(parents=True, exist_ok=True)
            fd = os.open(locks / name, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            self._cannot_write(e)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("waiting for another glyph-engine process that is building %s", name)
            fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _read(self, key: ArtifactKey, remove_damaged: bool = True, quiet: bool = False) -> Artifact | None:
        folder = self.root / key.name
        if not folder.exists():
            return None
        try:
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
                shutil.rmtree(folder, ignore_errors=True)
            return None
        return artifact

    def _store(self, key: ArtifactKey, artifact: Artifact) -> None:
        """Writes the entry in a staging folder and renames it into place (under the key's lock,
        so a staging folder found here is a killed build's leftover)."""
        final = self.root / key.name
        staging = self.root / f".{key.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir()
            entry = {"format": FORMAT, "key": asdict(key), "meta": artifact.meta, "files": {}}
            for name, data in artifact.files.items():
                (staging / name).write_bytes(data)
                entry["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            (staging / ENTRY).write_text(json.dumps(entry, indent=1))
            shutil.rmtree(final, ignore_errors=True)  # a damaged entry removed but still there
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _built(artifact: Artifact) -> Artifact:
    artifact.source = "built"
    return artifact


def _read_entry(folder: Path, key: ArtifactKey) -> Artifact:
    """The entry's files, each checked against its recorded size and sha256; ValueError names
    the first thing wrong."""
    try:
        entry = json.loads((folder / ENTRY).read_text())
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
        data = (folder / name).read_bytes()
        if len(data) != recorded.get("bytes") or hashlib.sha256(data).hexdigest() != recorded.get("sha256"):
            raise ValueError(f"{name} does not match its recorded sha256")
        contents[name] = data
    return Artifact(files=contents, meta=meta, source="cache")
