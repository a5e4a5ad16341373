"""The export artifact folder: ONNX (and later engine) files plus `manifest.json`.

Written by `glyph_engine.export`, read by the runtime backends. The manifest records what
made each file (source checkpoint hash, options, library versions) and each file's size and
sha256, so a reused folder is known to match and a damaged one is caught.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from glyph_engine.errors import GlyphEngineError
from glyph_engine.files import atomic_path, sha256_file

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "glyph-engine-export"
FORMAT_VERSION = 1
# Beside the manifest: {file: [size, mtime_ns, ctime_ns, sha256]} for each file whose hash last
# matched, so opening an export re-hashes only files that changed since (a rewrite changes
# mtime and ctime; ctime cannot be set back by hand).
VERIFIED = ".verified.json"


def default_export_dir(source: str | Path) -> Path:
    """Beside the checkpoint: `ckpt.pt` -> `ckpt-export/`, `glyffuser/` -> `glyffuser-export/`."""
    source = Path(source)
    stem = source.name if source.is_dir() else source.stem
    return source.with_name(f"{stem}-export")


def export_command(source: str | Path, folder: Path) -> str:
    """The command that (re)builds the export of `source` in `folder`."""
    out = "" if Path(folder) == default_export_dir(source) else f" --out {folder}"
    return f"glyph-engine export {source}{out}"


# --- the manifest's structure --------------------------------------------------------------
# Everything the readers of a manifest index, with its type, so that a damaged or hand-edited
# manifest is refused on reading, in one message, rather than failing later with a KeyError
# or TypeError. In a dict schema "name?" is an optional key; unlisted keys are allowed.


@dataclass(frozen=True)
class MapOf:
    """An object with any keys (`required` among them), each value matching `value`."""

    value: Any
    required: tuple[str, ...] = ()


@dataclass(frozen=True)
class ListOf:
    item: Any
    length: int | None = None


@dataclass(frozen=True)
class Where:
    """A value passing `test`, described for the message."""

    test: Callable[[Any], bool]
    description: str


def _is_inside(path: Any) -> bool:
    """A relative path that stays inside the export folder: the manifest names what is opened."""
    return isinstance(path, str) and path != "" and not path.startswith("/") and ".." not in PurePosixPath(path).parts


NUMBER = Where(lambda v: type(v) in (int, float), "a number")
FILE = {
    "path": Where(_is_inside, "a relative path inside the export folder"),
    "bytes": Where(lambda v: type(v) is int and v >= 0, "a byte count"),
    "sha256": Where(lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None, "a sha256"),
}
TENSOR = {"name": str, "dims": ListOf((str, int)), "dtype": str}
COMPONENT = {
    "inputs": ListOf(TENSOR),
    "outputs": ListOf(TENSOR),
    "ranges": MapOf(ListOf(int, 3)),
    "files": MapOf(FILE),
    "validation": MapOf({"max_abs_error": NUMBER, "min_cosine": NUMBER, "cases": list}),
}
ENGINE = {**FILE, "build_seconds": NUMBER, "layer_precisions": MapOf(int)}
SCHEMA = {
    "key": str,
    "source": {"path": str, "sha256": str},
    "components": MapOf(COMPONENT, required=("text_encoder", "unet")),
    "cpu_benchmark?": {
        "batch": int,
        "torch_ms": NUMBER,
        "onnxruntime_ms": NUMBER,
        "preferred": Where(lambda v: v in ("torch", "onnxruntime"), '"torch" or "onnxruntime"'),
    },
    "tensorrt?": MapOf(
        {
            "key": str,
            "module": str,
            "version": str,
            "target": str,
            "static_batch": Where(lambda v: v is None or type(v) is int, "a whole number or null"),
            "engines": MapOf(ENGINE),
        }
    ),
}


_KINDS = {bool: "true/false", int: "a whole number", float: "a number", str: "text", list: "a list", dict: "an object"}


def _kind(value: Any) -> str:
    return "null" if value is None else _KINDS.get(type(value), type(value).__name__)


def _mismatch(value: Any, schema: Any, where: str) -> str | None:
    """How `value` departs from `schema` (e.g. "manifest.components should be an object, not
    a list"), or None."""
    if isinstance(schema, dict | MapOf) and not isinstance(value, dict):
        return f"{where} should be an object, not {_kind(value)}"
    if isinstance(schema, dict):
        for key, sub in schema.items():
            name = key.removesuffix("?")
            if name in value:
                found = _mismatch(value[name], sub, f"{where}.{name}")
            else:
                found = None if key.endswith("?") else f"{where}.{name} is missing"
            if found:
                return found
        return None
    if isinstance(schema, MapOf):
        missing = [key for key in schema.required if key not in value]
        if missing:
            return f"{where}.{missing[0]} is missing"
        return _first(((f"{where}.{key}", item) for key, item in value.items()), schema.value)
    if isinstance(schema, ListOf):
        if not isinstance(value, list):
            return f"{where} should be a list, not {_kind(value)}"
        if schema.length is not None and len(value) != schema.length:
            return f"{where} should have {schema.length} entries, not {len(value)}"
        return _first(((f"{where}[{i}]", item) for i, item in enumerate(value)), schema.item)
    if isinstance(schema, Where):
        return None if schema.test(value) else f"{where} should be {schema.description}, not {str(value)[:40]!r}"
    types = schema if isinstance(schema, tuple) else (schema,)
    # JSON's true and false load as Python ints; a manifest never means them as numbers.
    if isinstance(value, types) and not isinstance(value, bool):
        return None
    return f"{where} should be {' or '.join(_KINDS[t] for t in types)}, not {_kind(value)}"


def _first(items: Iterator[tuple[str, Any]], schema: Any) -> str | None:
    return next((found for where, item in items if (found := _mismatch(item, schema, where))), None)


def read_manifest(folder: Path, source: str | Path | None = None) -> dict[str, Any]:
    """The manifest in `folder`, checked to have the structure the readers rely on.

    `source` names the checkpoint in the rebuild command that messages suggest; without it
    (`export` itself, which rebuilds a damaged folder) they say what is wrong only.
    """
    path = folder / MANIFEST
    rebuild = "" if source is None else f"; run `{export_command(source, folder)} --force` to rebuild it"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise GlyphEngineError(f"{folder} has no {MANIFEST}: it is not a finished glyph-engine export.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GlyphEngineError(f"{path} is unreadable or damaged ({e}){rebuild}.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GlyphEngineError(f"{path} is not a glyph-engine export manifest{rebuild}.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise GlyphEngineError(
            f"{path} has export format version {manifest.get('format_version')!r}; this glyph-engine reads "
            f"{FORMAT_VERSION}{rebuild}."
        )
    found = _mismatch(manifest, SCHEMA, "manifest")
    if found:
        raise GlyphEngineError(f"{path} is damaged ({found}){rebuild}.")
    return manifest


def onnx_files(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The ONNX file entries ({"path", "bytes", "sha256"}) the manifest lists."""
    return [entry for component in manifest.get("components", {}).values() for entry in component["files"].values()]


def engine_files(build: dict[str, Any]) -> list[dict[str, Any]]:
    """The engine file entries of one TensorRT build (`manifest["tensorrt"][name]`)."""
    return list(build.get("engines", {}).values())


def damaged_files(folder: Path, entries: list[dict[str, Any]]) -> list[str]:
    """Files that are missing, of the wrong size, or of the wrong content."""
    return [problem for entry in entries if (problem := _damage(folder, entry))]


def _damage(folder: Path, entry: dict[str, Any]) -> str | None:
    path = folder / entry["path"]
    if not path.is_file():
        return f"{entry['path']} is missing"
    if path.stat().st_size != entry["bytes"]:
        return f"{entry['path']} has {path.stat().st_size} bytes, not {entry['bytes']} (truncated?)"
    if sha256_file(path) != entry["sha256"]:
        return f"{entry['path']} has changed since export"
    return None


def damaged_files_cached(folder: Path, entries: list[dict[str, Any]]) -> list[str]:
    """`damaged_files` with hashes, hashing only the files changed since they last matched.

    One record serves every caller (the ONNX files, each TensorRT build): entries not checked
    here keep their stamps, so callers do not erase each other's.
    """
    record = _read_verified(folder)
    checked = {entry["path"] for entry in entries}
    verified = {path: stamp for path, stamp in record.items() if path not in checked}
    problems = []
    for entry in entries:
        try:
            stat = (folder / entry["path"]).stat()
        except OSError:
            stat = None  # _damage says what is wrong
        # Stamped before hashing: a file rewritten meanwhile gets a new stamp and is hashed again.
        stamp = None if stat is None else [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, entry["sha256"]]
        problem = None if stamp is not None and record.get(entry["path"]) == stamp else _damage(folder, entry)
        if problem:
            problems.append(problem)
        elif stamp is not None:
            verified[entry["path"]] = stamp
    if verified != record:
        _write_verified(folder, verified)
    return problems


def _read_verified(folder: Path) -> dict[str, Any]:
    try:
        record = json.loads((folder / VERIFIED).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # none yet, or unreadable: everything is hashed again
    return record if isinstance(record, dict) else {}


def _write_verified(folder: Path, verified: dict[str, Any]) -> None:
    try:
        with atomic_path(folder / VERIFIED) as tmp:
            tmp.write_text(json.dumps(verified))
    except OSError as e:  # e.g. a read-only export: still correct, hashed on every open
        logger.info("cannot record verified files in %s (%s)", folder, e)


def file_entry(folder: Path, path: Path) -> dict[str, Any]:
    return {"path": path.relative_to(folder).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Writes `manifest.json` atomically; returns the manifest as readers will see it."""
    text = json.dumps(manifest, indent=2)
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text(text)
    return json.loads(text)


def open_export(folder: Path, source_sha256: str, source: str) -> dict[str, Any]:
    """The manifest of a finished, intact export of the checkpoint with `source_sha256`.

    Checks the ONNX files' hashes, re-hashing only those changed since they last matched
    (see VERIFIED), so opening stays fast and a damaged file never reaches ONNX Runtime.
    """
    if not folder.is_dir():
        raise GlyphEngineError(
            f"{source} has no export at {folder}; run `{export_command(source, folder)}` first (or pass --export-dir)."
        )
    manifest = read_manifest(folder, source)
    if manifest["source"]["sha256"] != source_sha256:
        raise GlyphEngineError(
            f"the export in {folder} was made from another checkpoint; run `{export_command(source, folder)}` "
            "to refresh it."
        )
    problems = damaged_files_cached(folder, onnx_files(manifest))
    if problems:
        raise GlyphEngineError(
            f"the export in {folder} is damaged ({problems[0]}); run `{export_command(source, folder)} --force` "
            "to rebuild it."
        )
    return manifest
