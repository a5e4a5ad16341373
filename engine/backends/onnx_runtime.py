"""ONNX Runtime backend: runs the exported U-Net and T5 from an artifact folder.

CPU execution provider and FP32 files everywhere; with `onnxruntime-gpu`, the TensorRT or CUDA
providers and the FP16 files (or FP32 ones when asked), with inputs and outputs bound to torch
CUDA tensors (no host copies).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from glyph_engine.errors import GlyphEngineError
from glyph_engine.export_manifest import open_export
from glyph_engine.model import Glyffuser
from glyph_engine.precision import choose
from glyph_engine.settings import Precision
from glyph_engine.specs import text_encoder_feed, unet_feed

logger = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"


def _providers(device: torch.device | None) -> list[str]:
    """Providers to ask for: the GPU ones (if installed) unless the CPU is asked for."""
    if device is not None and device.type == "cpu":
        return [CPU_PROVIDER]
    available = ort.get_available_providers()
    gpu = [p for p in GPU_PROVIDERS if p in available] if torch.cuda.is_available() else []
    if device is not None and device.type == "cuda" and not gpu:
        raise GlyphEngineError(
            "the onnxruntime backend on CUDA needs onnxruntime-gpu and a CUDA GPU: "
            "pip install 'glyph-engine[onnx-gpu]', or run it on the CPU."
        )
    return [*gpu, CPU_PROVIDER]


@lru_cache(maxsize=8)
def _session(path: str, sha256: str, providers: tuple[str, ...]) -> ort.InferenceSession:
    """One session per file content and provider list for the life of the process.

    Creating a session (graph optimisation, kernel selection) is slow; keying by the
    manifest's sha256 too means a re-exported file at the same path gets a new session.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # intra-op threads: ORT's default, one per physical core. Inter-op parallelism only
    # adds contention for a sequential U-Net graph.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, options, providers=list(providers))


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self,
        model: Glyffuser,
        export_dir: Path,
        precision: Precision | str = Precision.auto,
        device: str | torch.device | None = None,
    ):
        """`device`: "cpu", "cuda", or None for a GPU where onnxruntime-gpu can use one.
        `precision` applies to both components' files (T5's FP16 file keeps its overflowing
        layers in FP32); auto takes the device's, among the precisions the export holds."""
        manifest = open_export(export_dir, model.sha256, model.source)
        files = {c: manifest["components"][c]["files"] for c in ("text_encoder", "unet")}
        held = {Precision(p) for p in files["unet"]} & {Precision(p) for p in files["text_encoder"]}
        asked = None if device is None else torch.device(device)
        providers = tuple(_providers(asked))
        self.sessions, chosen = self._open(export_dir, files, held, precision, providers)
        # Where the sessions run is decided by the providers they really got: a GPU provider may
        # fail to load, and ORT then falls back to the CPU silently.
        fell_back = [s for s in self.sessions.values() if s.get_providers()[0] == CPU_PROVIDER]
        if providers[0] != CPU_PROVIDER and fell_back:
            got = ", ".join(fell_back[0].get_providers())
            if asked is not None:
                raise GlyphEngineError(f"ONNX Runtime could not run on {device} here (its session got {got}).")
            logger.warning("onnxruntime: the GPU providers did not load (the session got %s); running on the CPU", got)
            self.sessions, chosen = self._open(export_dir, files, held, precision, (CPU_PROVIDER,))
        self.precision = chosen.value
        on_gpu = self.sessions["unet"].get_providers()[0] != CPU_PROVIDER
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        logger.info("onnxruntime: %s, %s", ", ".join(self.sessions["unet"].get_providers()), self.precision)

    def _open(
        self,
        export_dir: Path,
        files: dict[str, dict],
        held: set[Precision],
        requested: Precision | str,
        providers: tuple[str, ...],
    ) -> tuple[dict[str, ort.InferenceSession], Precision]:
        """Both components' sessions at the precision ONNX Runtime runs where `providers` run."""
        device = "cpu" if providers[0] == CPU_PROVIDER else "cuda"
        precision = choose(self.name, device, requested, available=held)
        if precision not in held:
            raise GlyphEngineError(
                f"the export in {export_dir} has no {precision.value} files, which ONNX Runtime on "
                f"{'the GPU' if device == 'cuda' else 'the CPU'} needs; re-export with --precision fp32,fp16."
            )
        sessions = {}
        for component, by_precision in files.items():
            entry = by_precision[precision.value]
            sessions[component] = _session(str(export_dir / entry["path"]), entry["sha256"], providers)
        return sessions, precision

    def _run(self, component: str, inputs: dict[str, Tensor]) -> Tensor:
        """Runs one session; the output is on this backend's device whatever the session's."""
        session = self.sessions[component]
        if session.get_providers()[0] == CPU_PROVIDER:
            feed = {name: value.cpu().numpy() for name, value in inputs.items()}
            return torch.from_numpy(session.run(None, feed)[0]).to(self.device)
        return self._run_bound(session, inputs)

    def _run_bound(self, session: ort.InferenceSession, inputs: dict[str, Tensor]) -> Tensor:
        # I/O binding: ORT reads and writes torch's CUDA memory directly. ORT runs on its own
        # stream, so torch's pending work on the inputs (the sampler step) must finish first.
        torch.cuda.current_stream(self.device).synchronize()
        binding = session.io_binding()
        for name, value in inputs.items():
            value = value.contiguous()
            binding.bind_input(
                name, "cuda", self.device.index, _numpy_dtype(value), list(value.shape), value.data_ptr()
            )
        output = session.get_outputs()[0].name
        binding.bind_output(output, "cuda", self.device.index)
        session.run_with_iobinding(binding)
        return torch.from_dlpack(binding.get_outputs()[0].to_dlpack())

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self._run("text_encoder", text_encoder_feed(input_ids, attention_mask, self.device))

    def denoise(self, x: Tensor, timestep: int, text: Tensor, mask: Tensor, guidance: float | None = None) -> Tensor:
        return self._run("unet", unet_feed(x, timestep, text, mask, self.device, guidance))


def _numpy_dtype(tensor: Tensor) -> type:
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[tensor.dtype]
