"""TensorRT at run time: the module adapter and the backend that runs an export's engines.

Two TensorRT Python modules are supported, through one small adapter (`TensorRT`):
- `tensorrt` (TensorRT 10/11): data-center and workstation GPUs; builds for the GPU it runs on.
- `tensorrt_rtx` (TensorRT-RTX; the PyPI wheels import as `tensorrt_rtx_bindings`): RTX
  GPUs; can build ahead of time for a chosen compute capability on a machine with no GPU.
Both are strongly typed (TensorRT 11 and RTX only are): an engine's precision is the
precision of the ONNX graph it was built from. Engines are built by `glyph_engine.export`,
from the FP16 ONNX files only, so the backend runs fp16 and refuses other precisions.

The backend is written against the documented runtime API (`deserialize_cuda_engine`,
`set_input_shape`, `set_tensor_address`, `execute_async_v3`); inputs and outputs are torch
CUDA tensors on torch's current stream, so text embeddings go from the T5 engine to the
U-Net engine without leaving the GPU.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
from torch import Tensor

from glyph_engine.errors import GlyphEngineError
from glyph_engine.export_manifest import damaged_files_cached, engine_files, open_export
from glyph_engine.model import Glyffuser
from glyph_engine.precision import choose
from glyph_engine.settings import Precision
from glyph_engine.specs import TEXT_ENCODER_OUTPUT, UNET_OUTPUT, text_encoder_feed, unet_feed

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


def require_gpu() -> None:
    if not torch.cuda.is_available():
        raise GlyphEngineError(
            "the tensorrt backend needs an NVIDIA GPU with CUDA and this machine has none; "
            "use --backend onnxruntime or --backend torch."
        )


def select_build(manifest: dict[str, Any], trt: TensorRT, target: str, source: str) -> tuple[str, dict[str, Any]]:
    """The engine build in `manifest` made by this TensorRT for this GPU; refuses any other."""
    builds = manifest.get("tensorrt", {})
    fitting = {
        name: b
        for name, b in builds.items()
        if b["target"] == target and b["module"] == trt.import_name and b["version"] == trt.version
    }
    if not fitting:
        found = ", ".join(f"{b['target']} ({b['module']} {b['version']})" for b in builds.values()) or "none"
        raise GlyphEngineError(
            f"no TensorRT engines for this GPU ({target}, {trt.import_name} {trt.version}) in the export "
            f"(found: {found}); run `glyph-engine export {source} --tensorrt` on this machine to build them."
        )
    # A dynamic-batch build serves every batch; a static one only its own.
    name = min(fitting, key=lambda n: fitting[n]["static_batch"] is not None)
    return name, fitting[name]


def batch_chunks(batch: int, low: int, high: int) -> list[int]:
    """Sizes of the pieces a batch runs in, each within the engine's profile [low, high].

    Rows are independent for both models (each image and prompt is its own), so a batch
    larger than the profile is split rather than refused; only a remainder the profile
    cannot take (a static-batch engine) is refused.
    """
    if low <= batch <= high:
        return [batch]
    if batch > high:
        full, rest = divmod(batch, high)
        if rest == 0 or rest >= low:
            return [high] * full + ([rest] if rest else [])
    raise GlyphEngineError(
        f"the TensorRT engine takes batches of {low} to {high} and cannot run {batch} rows; "
        f"choose --batch-size (and -n) so each U-Net call fits, or rebuild the engines "
        "(glyph-engine export --tensorrt, without --static-batch for any batch)."
    )


class Engine:
    """One serialized engine for its life: deserialize, bind torch tensors, run, CUDA graphs.

    It runs on a stream of its own: TensorRT on the legacy default stream would serialise
    with every other stream (and TensorRT warns about it). Each call waits for the caller's
    stream, and the caller's stream waits for the engine's, so ordering is as if inline.
    """

    TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT64": torch.int64, "INT32": torch.int32}

    def __init__(self, trt: TensorRT, plan: bytes, device: torch.device, use_cuda_graph: bool = False):
        self.runtime = trt.module.Runtime(trt.logger())
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise GlyphEngineError("TensorRT could not deserialize an engine (built for another GPU or version?).")
        self.context = self.engine.create_execution_context()
        self.device = device
        self.stream = torch.cuda.Stream(device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        output_mode = trt.module.TensorIOMode.OUTPUT
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == output_mode]
        first_input = next(n for n in names if self.engine.get_tensor_mode(n) != output_mode)
        low, _opt, high = self.engine.get_tensor_profile_shape(first_input, 0)
        self.batch_range = (int(low[0]), int(high[0]))  # every input shares the batch axis
        self.use_cuda_graph = use_cuda_graph
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, Tensor], dict[str, Tensor]]] = {}

    def _bind(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sets shapes and addresses; outputs are allocated on the caller's stream."""
        for name, value in inputs.items():
            if not self.context.set_input_shape(name, tuple(value.shape)):
                raise GlyphEngineError(
                    f"the TensorRT engine refused input {name} of shape {tuple(value.shape)} (outside its "
                    "optimization profile); rebuild the engines with `glyph-engine export --tensorrt --force`."
                )
            self._set_address(name, value)
        outputs = {}
        for name in self.outputs:
            dtype = self.TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device=self.device)
            self._set_address(name, outputs[name])
        return outputs

    def _set_address(self, name: str, value: Tensor) -> None:
        if not self.context.set_tensor_address(name, value.data_ptr()):
            raise GlyphEngineError(f"TensorRT refused the address of tensor {name} (misaligned or not on the GPU).")

    def _execute(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise GlyphEngineError("TensorRT failed to run the engine (run with -v for TensorRT's log).")

    def infer(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Runs `inputs` in pieces the engine's profile covers; outputs are concatenated."""
        batch = next(iter(inputs.values())).shape[0]
        sizes = batch_chunks(batch, *self.batch_range)
        if len(sizes) == 1:
            return {k: v.clone() if self.use_cuda_graph else v for k, v in self._infer_one(inputs).items()}
        pieces, start = [], 0
        for size in sizes:
            piece = self._infer_one({k: v[start : start + size] for k, v in inputs.items()})
            pieces.append({k: v.clone() if self.use_cuda_graph else v for k, v in piece.items()})
            start += size
        return {name: torch.cat([p[name] for p in pieces]) for name in self.outputs}

    def _infer_one(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """One run on the engine's stream, ordered after and before the caller's stream.

        With CUDA graphs the outputs are the graph's static buffers, valid until the next run.
        """
        inputs = {k: v.contiguous() for k, v in inputs.items()}
        caller = torch.cuda.current_stream(self.device)
        if self.use_cuda_graph:
            key = tuple((k, tuple(v.shape)) for k, v in inputs.items())
            if key not in self.graphs:
                self.graphs[key] = self._capture(inputs)
            graph, static_inputs, outputs = self.graphs[key]
            for name, value in inputs.items():
                static_inputs[name].copy_(value)
            run = graph.replay
        else:
            outputs = self._bind(inputs)
            run = lambda: self._execute(self.stream)  # noqa: E731
        self.stream.wait_stream(caller)
        for value in inputs.values():
            value.record_stream(self.stream)  # the caller may free it before the engine has read it
        with torch.cuda.stream(self.stream):
            run()
        caller.wait_stream(self.stream)
        return outputs

    def _capture(self, inputs: dict[str, Tensor]):
        """Captures one execution for these shapes; its buffers are reused by every replay."""
        static_inputs = {k: v.clone() for k, v in inputs.items()}
        outputs = self._bind(static_inputs)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self._execute(self.stream)  # TensorRT needs one run before capture (lazy allocations)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self._execute(self.stream)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return graph, static_inputs, outputs


class TensorRTBackend:
    name = "tensorrt"

    def __init__(
        self,
        model: Glyffuser,
        export_dir: Path,
        use_cuda_graph: bool = False,
        precision: Precision | str = Precision.auto,
    ):
        # Before the GPU check: what the engines run is the same on every machine.
        self.precision = choose(self.name, "cuda", precision).value
        require_gpu()
        trt = load_tensorrt()
        if trt is None:
            raise GlyphEngineError(
                "the tensorrt backend needs TensorRT: pip install 'glyph-engine[tensorrt]' "
                "(or [tensorrt-rtx] on RTX GPUs)."
            )
        manifest = open_export(export_dir, model.sha256, model.source)
        major, minor = torch.cuda.get_device_capability()
        name, build = select_build(manifest, trt, f"sm{major}{minor}", model.source)
        problems = damaged_files_cached(export_dir, engine_files(build))
        if problems:
            raise GlyphEngineError(
                f"the TensorRT engines in {export_dir} are damaged ({problems[0]}); "
                f"run `glyph-engine export {model.source} --tensorrt` to rebuild them."
            )
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.engines = {
            component: Engine(
                trt,
                (export_dir / entry["path"]).read_bytes(),
                self.device,
                use_cuda_graph and component == "unet",
            )
            for component, entry in build["engines"].items()
        }
        logger.info("tensorrt: engines %s (%s %s)", name, trt.import_name, trt.version)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        inputs = text_encoder_feed(input_ids, attention_mask, self.device)
        return self.engines["text_encoder"].infer(inputs)[TEXT_ENCODER_OUTPUT]

    def denoise(self, x: Tensor, timestep: int, text: Tensor, mask: Tensor, guidance: float | None = None) -> Tensor:
        return self.engines["unet"].infer(unet_feed(x, timestep, text, mask, self.device, guidance))[UNET_OUTPUT]
