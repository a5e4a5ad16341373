"""The export artifact folder: ONNX (and later engine) files plus `manifest.json`.

Written by `glyph_engine.export`, read by the runtime backends. The manifest records what
made each file (source checkpoint hash, options, library versions) and each file's size and
sha256, so a reused folder is known to match and a damaged one is caught.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glyph_engine.errors import GlyphEngineError
from glyph_engine.files import atomic_path, sha256_file

MANIFEST = "manifest.json"
FORMAT = "glyph-engine-export"
FORMAT_VERSION = 1


def default_export_dir(source: str | Path) -> Path:
    """Beside the checkpoint: `ckpt.pt` -> `ckpt-export/`, `glyffuser/` -> `glyffuser-export/`."""
    source = Path(source)
    stem = source.name if source.is_dir() else source.stem
    return source.with_name(f"{stem}-export")


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise GlyphEngineError(f"{folder} has no {MANIFEST}: it is not a finished glyph-engine export.") from None
    except (OSError, json.JSONDecodeError) as e:
        raise GlyphEngineError(f"{path} is unreadable or damaged ({e}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GlyphEngineError(f"{path} is not a glyph-engine export manifest.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise GlyphEngineError(
            f"{path} has export format version {manifest.get('format_version')!r}; this glyph-engine reads "
            f"{FORMAT_VERSION}. Re-export with `glyph-engine export --force`."
        )
    return manifest


def onnx_files(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The ONNX file entries ({"path", "bytes", "sha256"}) the manifest lists."""
    return [entry for component in manifest.get("components", {}).values() for entry in component["files"].values()]


def engine_files(build: dict[str, Any]) -> list[dict[str, Any]]:
    """The engine file entries of one TensorRT build (`manifest["tensorrt"][name]`)."""
    return list(build.get("engines", {}).values())


def damaged_files(folder: Path, entries: list[dict[str, Any]], check_hashes: bool = True) -> list[str]:
    """Files that are missing, of the wrong size, or (if `check_hashes`) of the wrong content."""
    problems = []
    for entry in entries:
        path = folder / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{entry['path']} has {path.stat().st_size} bytes, not {entry['bytes']} (truncated?)")
        elif check_hashes and sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']} has changed since export")
    return problems


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

    Checks sizes, not hashes, so opening stays fast; `glyph-engine export` checks hashes.
    """
    how = f"run `glyph-engine export {source}`"
    if not folder.is_dir():
        raise GlyphEngineError(f"{source} has no export at {folder}; {how} first (or pass --export-dir).")
    manifest = read_manifest(folder)
    if manifest.get("source", {}).get("sha256") != source_sha256:
        raise GlyphEngineError(f"the export in {folder} was made from another checkpoint; {how} to refresh it.")
    problems = damaged_files(folder, onnx_files(manifest), check_hashes=False)
    if problems:
        raise GlyphEngineError(f"the export in {folder} is damaged ({problems[0]}); {how} --force to rebuild it.")
    return manifest
