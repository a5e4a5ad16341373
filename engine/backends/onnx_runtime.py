"""ONNX Runtime backend: runs the exported U-Net and T5 from an artifact folder.

CPU execution provider everywhere; with `onnxruntime-gpu`, the TensorRT or CUDA providers
and FP16 files, with inputs and outputs bound to torch CUDA tensors (no host copies).
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
        precision: str | None = None,
        device: str | torch.device | None = None,
    ):
        """`device`: "cpu", "cuda", or None for a GPU where onnxruntime-gpu can use one."""
        manifest = open_export(export_dir, model.sha256, model.source)
        providers = tuple(_providers(None if device is None else torch.device(device)))
        files = {c: manifest["components"][c]["files"] for c in ("text_encoder", "unet")}
        # Where each session runs is decided by the providers it really got (a GPU provider
        # may fail to load, and ORT then falls back to the CPU silently).
        opened = {c: _session_for(export_dir, by_precision, precision, providers) for c, by_precision in files.items()}
        self.sessions = {c: session for c, (session, _) in opened.items()}
        self.precision = opened["unet"][1]
        on_gpu = self.sessions["unet"].get_providers()[0] != CPU_PROVIDER
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        if device is not None and torch.device(device).type != self.device.type:
            got = ", ".join(self.sessions["unet"].get_providers())
            raise GlyphEngineError(f"ONNX Runtime could not run on {device} here (its session got {got}).")
        logger.info("onnxruntime: %s, %s", ", ".join(self.sessions["unet"].get_providers()), self.precision)

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
            value = value.to(self.device).contiguous()
            binding.bind_input(
                name, "cuda", self.device.index, _numpy_dtype(value), list(value.shape), value.data_ptr()
            )
        output = session.get_outputs()[0].name
        binding.bind_output(output, "cuda", self.device.index)
        session.run_with_iobinding(binding)
        return torch.from_dlpack(binding.get_outputs()[0].to_dlpack())

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        ids, mask = input_ids.to(self.device, torch.int64), attention_mask.to(self.device, torch.int64)
        return self._run("text_encoder", {"input_ids": ids, "attention_mask": mask})

    def denoise(self, x: Tensor, timestep: int, text: Tensor, mask: Tensor) -> Tensor:
        batch = x.shape[0]
        return self._run(
            "unet",
            {
                "sample": x.to(self.device, torch.float32),
                "timestep": torch.full((batch,), float(timestep), device=self.device),
                "encoder_hidden_states": text.to(self.device, torch.float32),
                "encoder_attention_mask": mask.to(self.device, torch.int64),
            },
        )


def _session_for(
    export_dir: Path, by_precision: dict, precision: str | None, providers: tuple[str, ...]
) -> tuple[ort.InferenceSession, str]:
    """The session for one component: FP16 files on a GPU, FP32 on a CPU (no fast half math).

    The first choice is tried with the providers asked for; if it lands on the CPU, the FP32
    file is used instead, so the precision always matches where the session really runs.
    """
    on_gpu = providers[0] != CPU_PROVIDER
    wanted = precision or ("fp16" if on_gpu else "fp32")
    if wanted not in by_precision:
        raise GlyphEngineError(
            f"the export in {export_dir} has no {wanted} files, which ONNX Runtime on "
            f"{'the GPU' if on_gpu else 'the CPU'} needs; re-export with --precision fp32,fp16."
        )
    entry = by_precision[wanted]
    session = _session(str(export_dir / entry["path"]), entry["sha256"], providers)
    if precision is None and on_gpu and session.get_providers()[0] == CPU_PROVIDER and "fp32" in by_precision:
        logger.warning("onnxruntime: the GPU providers did not load; running the FP32 files on the CPU")
        entry, wanted = by_precision["fp32"], "fp32"
        session = _session(str(export_dir / entry["path"]), entry["sha256"], (CPU_PROVIDER,))
    return session, wanted


def _numpy_dtype(tensor: Tensor) -> type:
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[tensor.dtype]
