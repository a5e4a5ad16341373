"""File helpers: atomic writes (never over a device, FIFO or folder), staging folders, content hashes and
zip checksums."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import logging
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from glyph_engine.errors import GlyphEngineError

logger = logging.getLogger(__name__)

# Inside a staging folder: the file its building process holds an flock on. The kernel drops
# the lock when the process ends, however it ends, so a folder whose lock can be taken is
# a killed build's leftover; unlike a recorded PID, this cannot be fooled by PID reuse.
STAGING_LOCK = ".staging.lock"


@contextmanager
def atomic_path(path: str | os.PathLike, follow_symlinks: bool = True) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it over `path` only on success.

    A crash or exception leaves `path` as it was and removes the temporary file, so readers
    never see a half-written output. What `refuse_non_regular` refuses is refused before the
    caller does any work; a symlink keeps pointing where it did and its target gets the file.
    `follow_symlinks=False` (files inside a folder glyph-engine owns, such as a bulk job's)
    refuses a symlink instead, and the rename then replaces the name itself: a symlink swapped
    in meanwhile is replaced, never written through.
    """
    path = Path(path)
    if not follow_symlinks and kind_of(path) == SYMLINK:
        raise GlyphEngineError(f"refusing to write {path}: it is a symlink; remove it and run again.")
    target = refuse_non_regular(path)
    if not follow_symlinks:
        target = path  # renamed over the name itself, whatever it has become meanwhile
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(0o666 & ~current_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


REGULAR_FILE, FOLDER, SYMLINK = "a regular file", "a folder", "a symlink"
_KINDS = (
    (stat.S_ISREG, REGULAR_FILE),
    (stat.S_ISDIR, FOLDER),
    (stat.S_ISLNK, SYMLINK),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def kind_of(path: str | os.PathLike) -> str | None:
    """What is at `path` itself, in words (a symlink is not followed); None when nothing is."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    return next((name for is_kind, name in _KINDS if is_kind(mode)), "a special file")


def refuse_non_regular(path: str | os.PathLike, what: str = "a file name") -> Path:
    """The place a write to `path` renames its new file over: `path`, or a symlink's final target.

    Renaming over a device, FIFO, socket or folder would silently turn it into a plain file (as
    root, /dev/null into a PNG), so anything but a regular file or nothing is refused with one
    sentence ending in "give {what}". A symlink is written through, as `cp` would, if its
    target is a regular file or nothing in an existing folder.
    """
    path = Path(path)
    kind = kind_of(path)
    if kind in (None, REGULAR_FILE):
        return path
    if kind != SYMLINK:
        raise GlyphEngineError(f"refusing to write {path}: it is {kind}, not a regular file; give {what}.")
    target = Path(os.path.realpath(path))
    target_kind = kind_of(target)
    if target_kind == REGULAR_FILE or (target_kind is None and target.parent.is_dir()):
        return target
    if target_kind is None:
        raise GlyphEngineError(
            f"refusing to write {path}: it is a symlink to {target}, whose folder does not exist; give {what}."
        )
    # realpath leaves a symlink only where the chain loops.
    what_is_there = "a symlink loop" if target_kind == SYMLINK else target_kind
    raise GlyphEngineError(
        f"refusing to write {path}: it is a symlink to {what_is_there}, not to a regular file; give {what}."
    )


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_staging_dir(target: Path, suffix: str) -> Path:
    """An empty hidden folder beside `target`, with the usual permissions (not mkdtemp's 0700)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent))
    staging.chmod(0o777 & ~current_umask())
    return staging


@contextmanager
def owned_staging_dir(target: Path, suffix: str, attempts: int = 5) -> Iterator[Path]:
    """`make_staging_dir`, locked by this process while the block runs and removed after it
    (unless the block renamed it; it must then remove STAGING_LOCK from the new place).

    `remove_stale_staging_dirs` in any process leaves a locked folder alone.
    """
    for _ in range(attempts):
        try:
            owned = _new_locked_dir(target, suffix)
        except OSError as e:
            raise GlyphEngineError(f"cannot write beside {target} ({e.strerror}); choose another place.") from None
        if owned is not None:
            break
    else:
        raise GlyphEngineError(f"cannot create a folder in {target.parent}; check that it exists and is writable.")
    staging, fd = owned
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(fd)


def _new_locked_dir(target: Path, suffix: str) -> tuple[Path, int] | None:
    """A new staging folder and the descriptor holding its lock; None if a concurrent
    `remove_stale_staging_dirs` took it for a leftover in the moment before it was locked."""
    try:
        staging = make_staging_dir(target, suffix)
        fd = os.open(staging / STAGING_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except FileNotFoundError:
        return None
    fcntl.flock(fd, fcntl.LOCK_EX)  # waits while a cleaner that got there first removes it
    if _is_open_file(fd, staging / STAGING_LOCK):
        return staging, fd
    os.close(fd)
    return None


def _is_open_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def remove_stale_staging_dirs(target: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Removes the hidden `.NAME.*SUFFIX` folders beside `target` that no live process owns
    (see `owned_staging_dir`): what killed runs left behind. Returns the folders removed."""
    removed = []
    for name in glob.glob(f".{glob.escape(target.name)}.*", root_dir=target.parent):
        folder = target.parent / name
        if folder.suffix in suffixes and folder.is_dir() and not folder.is_symlink() and _remove_if_unowned(folder):
            removed.append(folder)
    return removed


def _remove_if_unowned(folder: Path) -> bool:
    # Creating the lock file when it is missing (a folder from before these locks, or one
    # created a moment ago) makes the owner's own lock attempt see that it lost the folder.
    try:
        fd = os.open(folder / STAGING_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return False  # gone already, or not ours to touch
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not _is_open_file(fd, folder / STAGING_LOCK):
            return False  # its owner finished and renamed it away meanwhile
        shutil.rmtree(folder, ignore_errors=True)
    except BlockingIOError:
        return False  # a live process is building it
    finally:
        os.close(fd)
    if folder.exists():
        logger.warning("could not remove the stale staging folder %s; remove it by hand", folder)
        return False
    return True


@contextmanager
def working_in(folder: Path, command: str) -> Iterator[None]:
    """Holds `folder` (created if missing) for one run of `command` (`glyph-engine distill`,
    `train`): a second run on the same work folder would silently overwrite the first one's
    state. An flock on the folder itself (no lock file is left), dropped by the kernel when the
    process ends, however it ends. A folder made here and still empty when the run fails
    (refused before it wrote anything) is removed again."""
    made = not os.path.lexists(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise GlyphEngineError(
            f"cannot use {folder} as the work folder ({e.strerror or e}); give another --workdir."
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GlyphEngineError(
                f"another `glyph-engine {command}` is running in {folder}; wait for it to end (or stop it), "
                "or give another --workdir."
            ) from None
        yield
    except BaseException:
        if made:
            with contextlib.suppress(OSError):  # not empty: the run wrote something worth keeping
                folder.rmdir()
        raise
    finally:
        os.close(fd)


def check_writable_file(path: str | os.PathLike) -> Path:
    """Fails early, before minutes of work, if `path` cannot be written (as `atomic_path` would)."""
    path = Path(path)
    try:
        target = refuse_non_regular(path)
    except OSError as e:  # lstat itself failed: no permission to look in the folder
        raise GlyphEngineError(f"cannot write {path}: {e.strerror}; choose another output path.") from None
    parent = target.parent
    if not parent.is_dir():
        raise GlyphEngineError(f"cannot write {path}: folder {parent} does not exist; create it first.")
    # A real probe rather than os.access: root passes access checks on read-only mounts.
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=parent)
    except OSError as e:
        raise GlyphEngineError(f"cannot write {path}: {e.strerror}; choose another output path.") from None
    os.close(fd)
    os.unlink(probe)
    return path


def read_regular_file(path: str | os.PathLike) -> bytes | None:
    """The contents of `path` if it is a regular file; None if it is missing, a link or anything else.

    The descriptor is checked, not the name, so a file swapped in after a check is not read instead;
    O_NONBLOCK keeps a FIFO from hanging the open.
    """
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None  # never opened: opening a device can have effects of its own
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:  # became a symlink since lstat
            return None
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read() if stat.S_ISREG(os.fstat(fd).st_mode) else None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def zip_damage(path: str | os.PathLike) -> str | None:
    """Why the zip archive at `path` fails its own consistency checks, or None if it passes.

    torch.save writes a zip with a CRC-32 of every member (the pickled fields and each
    tensor's bytes), which torch.load never checks. Checking them catches any accidental
    change to the contents at the cost of one read (about 2.5 GB/s here).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as e:  # noqa: BLE001 - damaged headers make zipfile raise many types
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    # torch.save files every member under a folder named after the file it first wrote.
    return None if bad is None else f"its part {bad.partition('/')[2] or bad} fails its CRC-32 check"
