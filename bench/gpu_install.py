"""make gpu-check, step 1: a GPU machine has no network; what glyph-engine needs there and
lacks (diffusers, glyph-engine itself, ...) is installed from `wheels/` (`make gpu-wheels`),
then the check restarts so the new packages are seen.

Imports nothing of glyph-engine or diffusers: it runs before they are installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from gpu_results import one_line

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "wheels"
# Set across the restart after installing: what was installed (and that it was tried once).
INSTALLED_ENV = "GPU_CHECK_INSTALLED"
# What the CUDA path imports beyond the GPU machine's own software; one missing means install.
NEEDED_MODULES = ("glyph_engine", "diffusers", "PIL", "sentencepiece")


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them ("Pillow", "charset_normalizer" -> "charset-normalizer")."""
    return re.sub(r"[-_.]+", "-", name).lower()


def is_installed(distribution: str) -> bool:
    try:
        version(distribution)
    except PackageNotFoundError:
        return False
    return True


def install_missing(script: Path) -> dict[str, Any]:
    """Installs from wheels/ the distributions this Python lacks, and glyph-engine itself
    (editable, offline); then restarts `script`, since an editable install is only seen by a
    new interpreter. Returns what was installed (after the restart) or why nothing was."""
    if INSTALLED_ENV in os.environ:
        return json.loads(os.environ.pop(INSTALLED_ENV))  # popped: the pytest runs must not inherit it
    if all(importlib.util.find_spec(m) is not None for m in NEEDED_MODULES):
        return {"installed": [], "note": "nothing missing"}
    if not WHEELS.is_dir():
        return {"installed": [], "note": "modules missing and no wheels/ folder: run `make gpu-wheels` and carry it"}
    # A wheel's file name starts with its distribution's name.
    wheels = sorted(p for p in WHEELS.glob("*.whl") if not is_installed(normalized(p.name.split("-")[0])))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--find-links", str(WHEELS)]
    commands = [[*pip, *map(str, wheels)]] if wheels else []
    installed = [p.name for p in wheels]
    if importlib.util.find_spec("glyph_engine") is None:
        # Built in isolation with setuptools and wheel from wheels/; its dependencies are the
        # wheels above and the machine's own software, so --no-deps.
        commands.append([*pip, "--editable", str(ROOT)])
        installed.append("glyph-engine (editable)")
    if not commands:
        return {"installed": [], "note": "modules missing, but wheels/ has nothing this Python lacks"}
    record: dict[str, Any] = {"installed": installed}
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            record.setdefault("errors", []).append(one_line(result.stderr))
    print(f"gpu-check: installed {', '.join(installed)} from wheels/; restarting", flush=True)
    os.environ[INSTALLED_ENV] = json.dumps(record)
    os.execv(sys.executable, [sys.executable, str(script), *sys.argv[1:]])
