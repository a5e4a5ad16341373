"""The artifact cache: keys, reuse, damage, read-only and full caches, two processes at once."""

import errno
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from glyph_engine.cache import ENV_VAR, Artifact, ArtifactCache, ArtifactKey, default_cache_dir

KEY = ArtifactKey("ab" * 32, "openvino", "fp32", (("openvino", "1.0"),), ("avx2",))


class Builder:
    def __init__(self, files=None):
        self.files = files or {"unet.blob": b"compiled" * 100, "text_encoder.blob": b"t5"}
        self.calls = 0

    def __call__(self) -> Artifact:
        self.calls += 1
        return Artifact(files=dict(self.files), meta={"gate": {"passed": True}})


def test_key_covers_model_kind_precision_versions_and_cpu():
    variants = [
        ArtifactKey("cd" * 32, *list(vars(KEY).values())[1:]),
        ArtifactKey(KEY.model_sha256, "onnx", KEY.precision, KEY.versions, KEY.cpu_flags),
        ArtifactKey(KEY.model_sha256, KEY.kind, "bf16", KEY.versions, KEY.cpu_flags),
        ArtifactKey(KEY.model_sha256, KEY.kind, KEY.precision, (("openvino", "1.1"),), KEY.cpu_flags),
        ArtifactKey(KEY.model_sha256, KEY.kind, KEY.precision, KEY.versions, ("avx2", "avx512_bf16")),
    ]
    names = {KEY.name, *(v.name for v in variants)}
    assert len(names) == 6 and KEY.name.startswith("openvino-fp32-")


def test_built_once_then_read(tmp_path):
    cache, build = ArtifactCache(tmp_path / "cache"), Builder()
    first = cache.get(KEY, build)
    second = cache.get(KEY, build)
    assert build.calls == 1 and (first.source, second.source) == ("built", "cache")
    assert second.files == build.files and second.meta == {"gate": {"passed": True}}
    assert cache.peek(KEY) == {"gate": {"passed": True}}
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [KEY.name]


def test_default_folder_follows_env_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "glyph-engine"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: relative paths are invalid
    assert default_cache_dir() == Path.home() / ".cache" / "glyph-engine"


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda entry: flip_byte(entry / "unet.blob"),
        lambda entry: (entry / "unet.blob").write_bytes(b"compiled"),  # truncated
        lambda entry: (entry / "text_encoder.blob").unlink(),
        lambda entry: (entry / "entry.json").write_text("{not json"),
        lambda entry: (entry / "entry.json").write_text('{"format": 1, "key": {}, "files": {}, "meta": {}}'),
    ],
    ids=["flipped-byte", "truncated", "missing-file", "bad-json", "foreign-key"],
)
def test_damaged_entry_is_rebuilt_never_used(tmp_path, damage, caplog):
    cache, build = ArtifactCache(tmp_path), Builder()
    cache.get(KEY, build)
    damage(tmp_path / KEY.name)
    assert cache.peek(KEY) is None  # peek never trusts it either
    with caplog.at_level(logging.WARNING):
        artifact = cache.get(KEY, build)
    assert build.calls == 2 and artifact.files == build.files
    assert any("damaged" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert cache.get(KEY, build).source == "cache"  # the rebuilt entry is sound


def test_killed_build_leftover_is_replaced(tmp_path):
    leftover = tmp_path / f".{KEY.name}.partial"
    leftover.mkdir(parents=True)
    (leftover / "unet.blob").write_bytes(b"half")
    cache, build = ArtifactCache(tmp_path), Builder()
    assert cache.get(KEY, build).source == "built" and not leftover.exists()
    assert cache.get(KEY, build).source == "cache"


def _fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, __import__("os").strerror(code))

    return fail


def test_read_only_cache_builds_in_memory_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(Path, "mkdir", _fail_with(errno.EROFS))
    cache, build = ArtifactCache(tmp_path / "ro"), Builder()
    other = ArtifactKey(KEY.model_sha256, KEY.kind, "bf16", KEY.versions, KEY.cpu_flags)
    with caplog.at_level(logging.WARNING):
        artifacts = [cache.get(KEY, build), cache.get(other, build)]
    assert [a.source for a in artifacts] == ["built", "built"] and artifacts[0].files == build.files
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot write the artifact cache" in warnings[0] and ENV_VAR in warnings[0]
    assert not (tmp_path / "ro").exists()


def test_read_only_cache_still_serves_its_entries(tmp_path, monkeypatch):
    cache, build = ArtifactCache(tmp_path), Builder()
    cache.get(KEY, build)
    real_open = os.open

    def read_only_mount(path, flags, *args, **kwargs):  # what EROFS refuses: opening to write, not to read
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr("glyph_engine.cache.os.open", read_only_mount)  # no lock file can be made
    assert ArtifactCache(tmp_path).get(KEY, build).source == "cache" and build.calls == 1


def test_full_cache_falls_back_and_leaves_nothing_half_written(tmp_path, monkeypatch, caplog):
    cache, build = ArtifactCache(tmp_path), Builder()
    monkeypatch.setattr(Path, "write_bytes", _fail_with(errno.ENOSPC))
    with caplog.at_level(logging.WARNING):
        artifact = cache.get(KEY, build)
    assert artifact.files == build.files and artifact.source == "built"
    assert "No space left" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == [".locks"]  # no entry, no staging folder


def test_no_root_keeps_nothing(tmp_path):
    cache, build = ArtifactCache(None), Builder()
    cache.get(KEY, build), cache.get(KEY, build)
    assert build.calls == 2 and cache.peek(KEY) is None


def _sized(rows: int) -> ArtifactKey:
    return ArtifactKey(KEY.model_sha256, f"openvino-unet-{rows}x3", "bf16", KEY.versions, KEY.cpu_flags)


def test_prune_keeps_the_most_recently_used_of_a_kind(tmp_path):
    cache, build = ArtifactCache(tmp_path), Builder()
    cache.get(KEY, build)  # another kind: never pruned by the sized entries' prefix
    for age, rows in enumerate((1, 2, 3, 4)):
        cache.get(_sized(rows), build)
        os.utime(tmp_path / _sized(rows).name, (1000 + age, 1000 + age))  # built in this order
    cache.get(_sized(1), build)  # read again: now the most recently used
    cache.prune("openvino-unet-", 2)
    left = {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")}
    assert left == {KEY.name, _sized(1).name, _sized(4).name} and build.calls == 5


def test_prune_leaves_an_entry_being_built(tmp_path):
    cache, build = ArtifactCache(tmp_path), Builder()
    for rows in (1, 2):
        cache.get(_sized(rows), build)
        os.utime(tmp_path / _sized(rows).name, (1000 + rows, 1000 + rows))
    held = cache._lock(_sized(1).name)  # as a process rebuilding the older one holds it
    try:
        cache.prune("openvino-unet-", 1)
    finally:
        os.close(held)
    assert (tmp_path / _sized(1).name).is_dir() and (tmp_path / _sized(2).name).is_dir()
    cache.prune("openvino-unet-", 1)
    assert not (tmp_path / _sized(1).name).exists() and (tmp_path / _sized(2).name).is_dir()


CONCURRENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from glyph_engine.cache import Artifact, ArtifactCache, ArtifactKey
    key = ArtifactKey("ab" * 32, "openvino", "fp32", (), ())
    root, log = Path(sys.argv[1]), Path(sys.argv[2])

    def build():
        with log.open("a") as f:
            f.write("built\\n")
        time.sleep(1.0)  # long enough that the other process arrives while this one builds
        return Artifact(files={"unet.blob": b"x" * 1000})

    artifact = ArtifactCache(root).get(key, build)
    print(artifact.source, len(artifact.files["unet.blob"]))
    """
)


def test_two_processes_build_once(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(CONCURRENT)
    log = tmp_path / "builds.log"
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "cache"), str(log)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = sorted(w.communicate(timeout=120)[0].strip() for w in workers)
    assert all(w.returncode == 0 for w in workers)
    assert outputs == ["built 1000", "cache 1000"] and log.read_text() == "built\n"


# --- what is found where an entry, its lock or its staging folder goes ---------------------


@pytest.fixture
def outside(tmp_path):
    """A folder beside the cache with a file in it: nothing the cache does may change either."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    return folder


@pytest.fixture
def fails_if_it_waits():
    """Opening a FIFO to read it waits for a writer forever: fail the test instead of hanging."""

    def waited(*args):
        pytest.fail("the cache waited on a FIFO")

    previous = signal.signal(signal.SIGALRM, waited)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


ENTRY_DAMAGE = {
    "file": lambda entry, outside: entry.write_bytes(b"not a folder"),
    "fifo": lambda entry, outside: os.mkfifo(entry),
    "symlink-to-file": lambda entry, outside: entry.symlink_to(outside / "precious.txt"),
    "symlink-to-folder": lambda entry, outside: entry.symlink_to(outside),
    "dangling-symlink": lambda entry, outside: entry.symlink_to(outside / "missing"),
}


@pytest.mark.parametrize("plant", ENTRY_DAMAGE.values(), ids=ENTRY_DAMAGE.keys())
def test_an_entry_that_is_not_a_folder_is_replaced_once(tmp_path, outside, plant, caplog, fails_if_it_waits):
    root = tmp_path / "cache"
    root.mkdir()
    plant(root / KEY.name, outside)
    before = contents(outside)
    build = Builder()
    with caplog.at_level(logging.WARNING):
        assert ArtifactCache(root).get(KEY, build).source == "built"
    assert "rebuilding it" in caplog.text and "cannot write" not in caplog.text
    entry = root / KEY.name
    assert entry.is_dir() and not entry.is_symlink()
    assert ArtifactCache(root).get(KEY, build).source == "cache" and build.calls == 1
    assert contents(outside) == before  # a symlink was removed, not what it pointed to


LOCK_DAMAGE = {
    "lock-dangling-symlink": lambda root, outside: (root / ".locks" / KEY.name).symlink_to(outside / "made.lock"),
    "lock-symlink-to-file": lambda root, outside: (root / ".locks" / KEY.name).symlink_to(outside / "precious.txt"),
    "lock-fifo": lambda root, outside: os.mkfifo(root / ".locks" / KEY.name),
    "lock-folder": lambda root, outside: (root / ".locks" / KEY.name / "inner").mkdir(parents=True),
    "locks-symlink-to-folder": lambda root, outside: (
        (root / ".locks").rmdir(),
        (root / ".locks").symlink_to(outside),
    ),
    "staging-symlink-to-folder": lambda root, outside: (root / f".{KEY.name}.partial").symlink_to(outside),
}


@pytest.mark.parametrize("plant", LOCK_DAMAGE.values(), ids=LOCK_DAMAGE.keys())
def test_a_damaged_lock_or_staging_path_is_replaced_never_followed(tmp_path, outside, plant, caplog, fails_if_it_waits):
    root = tmp_path / "cache"
    (root / ".locks").mkdir(parents=True)
    plant(root, outside)
    before = contents(outside)
    build = Builder()
    with caplog.at_level(logging.WARNING):
        assert ArtifactCache(root).get(KEY, build).source == "built"
    assert "cannot write" not in caplog.text
    assert ArtifactCache(root).get(KEY, build).source == "cache" and build.calls == 1
    lock = root / ".locks" / KEY.name
    assert stat.S_ISDIR((root / ".locks").lstat().st_mode) and stat.S_ISREG(lock.lstat().st_mode)
    assert contents(outside) == before


def test_a_fifo_inside_an_entry_is_damage_not_a_wait(tmp_path, fails_if_it_waits):
    cache, build = ArtifactCache(tmp_path), Builder()
    cache.get(KEY, build)
    (tmp_path / KEY.name / "entry.json").unlink()
    os.mkfifo(tmp_path / KEY.name / "entry.json")
    assert cache.get(KEY, build).source == "built" and build.calls == 2
    assert cache.get(KEY, build).source == "cache"
