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

from glyph_engine.artifacts import open_export
from glyph_engine.errors import GlyphEngineError
from glyph_engine.model import Glyffuser

logger = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def _providers() -> list[str]:
    available = ort.get_available_providers()
    gpu = [p for p in GPU_PROVIDERS if p in available] if torch.cuda.is_available() else []
    return [*gpu, "CPUExecutionProvider"]


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

    def __init__(self, model: Glyffuser, export_dir: Path, precision: str | None = None):
        manifest = open_export(export_dir, model.sha256, model.source)
        providers = tuple(_providers())
        on_gpu = providers[0] != "CPUExecutionProvider"
        self.device = torch.device("cuda" if on_gpu else "cpu")
        # FP16 files on a GPU; on a CPU FP16 is slower than FP32 (no fast half math).
        precision = precision or ("fp16" if on_gpu else "fp32")
        self.precision = precision
        self.sessions = {}
        for component in ("text_encoder", "unet"):
            files = manifest["components"][component]["files"]
            if precision not in files:
                raise GlyphEngineError(
                    f"the export in {export_dir} has no {precision} {component}; re-export with that precision."
                )
            entry = files[precision]
            self.sessions[component] = _session(str(export_dir / entry["path"]), entry["sha256"], providers)
        logger.info("onnxruntime: %s, %s", ", ".join(providers), precision)

    def _run(self, component: str, inputs: dict[str, Tensor]) -> Tensor:
        session = self.sessions[component]
        if self.device.type == "cpu":
            feed = {name: value.numpy() for name, value in inputs.items()}
            return torch.from_numpy(session.run(None, feed)[0])
        return self._run_bound(session, inputs)

    def _run_bound(self, session: ort.InferenceSession, inputs: dict[str, Tensor]) -> Tensor:
        # I/O binding: ORT reads and writes torch's CUDA memory directly.
        binding = session.io_binding()
        for name, value in inputs.items():
            value = value.contiguous()
            binding.bind_input(
                name, "cuda", value.device.index or 0, _numpy_dtype(value), list(value.shape), value.data_ptr()
            )
        output = session.get_outputs()[0].name
        binding.bind_output(output, "cuda", self.device.index or 0)
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


def _numpy_dtype(tensor: Tensor) -> type:
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[tensor.dtype]
