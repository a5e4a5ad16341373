"""One small adapter over the two TensorRT Python modules.

- `tensorrt` (TensorRT 10/11): data-center and workstation GPUs; builds for the GPU it runs on.
- `tensorrt_rtx` (TensorRT-RTX; the PyPI wheels import as `tensorrt_rtx_bindings`): RTX
  GPUs; can build ahead of time for a chosen compute capability on a machine with no GPU.

Both are strongly typed (TensorRT 11 and RTX only are): an engine's precision is the
precision of the ONNX graph it was built from.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

from glyph_engine.errors import GlyphEngineError

logger = logging.getLogger(__name__)

Flavour = Literal["tensorrt", "tensorrt_rtx"]

# (import name, flavour), in order of preference.
MODULES: tuple[tuple[str, Flavour], ...] = (
    ("tensorrt", "tensorrt"),
    ("tensorrt_rtx", "tensorrt_rtx"),
    ("tensorrt_rtx_bindings", "tensorrt_rtx"),
)


@dataclass(frozen=True)
class TensorRT:
    module: ModuleType
    import_name: str
    flavour: Flavour

    @property
    def version(self) -> str:
        return str(self.module.__version__)

    @property
    def ahead_of_time(self) -> bool:
        """Whether engines can be built for a chosen GPU without that GPU present."""
        return hasattr(self.module, "ComputeCapability")

    def logger(self):
        """A TensorRT logger that forwards to Python logging (shown with -v).

        TensorRT prints its own warnings and errors otherwise, including harmless ones on a
        machine without a GPU (no timing cache there); failures reach the user as
        GlyphEngineError messages instead.
        """
        severity = self.module.ILogger.Severity
        levels = {
            severity.INTERNAL_ERROR: logging.ERROR,
            severity.ERROR: logging.INFO,
            severity.WARNING: logging.INFO,
            severity.INFO: logging.DEBUG,
            severity.VERBOSE: logging.DEBUG,
        }

        class ForwardingLogger(self.module.ILogger):
            def log(self, level, message):
                logger.log(levels.get(level, logging.DEBUG), "TensorRT: %s", message)

        return ForwardingLogger()

    def compute_capability(self, target: str):
        """The module's enum for a target like "8.6" or "sm86"."""
        name = "SM" + target.lower().removeprefix("sm").replace(".", "")
        if not self.ahead_of_time:
            raise GlyphEngineError(
                f"{self.import_name} {self.version} builds only for the GPU it runs on; ahead-of-time targets "
                "(--compute-capability) need TensorRT-RTX: pip install 'glyph-engine[tensorrt-rtx]'."
            )
        choices = [c for c in dir(self.module.ComputeCapability) if c.startswith("SM")]
        if name not in choices:
            raise GlyphEngineError(
                f"{self.import_name} {self.version} cannot target compute capability {target}; "
                f"it supports {', '.join(c[2:-1] + '.' + c[-1] for c in choices)}."
            )
        return getattr(self.module.ComputeCapability, name)


def load_tensorrt(import_name: str | None = None) -> TensorRT | None:
    """The first importable TensorRT module (or the named one); None when there is none."""
    for name, flavour in MODULES:
        if import_name is not None and name != import_name:
            continue
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the PyPI `tensorrt` stubs raise on import without the vendor index
            continue
        if hasattr(module, "Builder"):
            return TensorRT(module, name, flavour)
    return None


def normalize_target(target: str) -> str:
    """'8.6', '86', 'sm86', 'SM_86' -> 'sm86'."""
    digits = "".join(ch for ch in target if ch.isdigit())
    if len(digits) not in (2, 3):
        raise GlyphEngineError(f"--compute-capability {target!r} is not a compute capability such as 8.6 or 12.0.")
    return f"sm{digits}"
