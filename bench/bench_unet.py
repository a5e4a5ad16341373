"""U-Net throughput (images/s) per backend and batch on this machine.

`pytest bench/bench_unet.py --benchmark-only`; each call is one U-Net evaluation of `batch`
images at text length 16, through the same Backend.denoise that generation uses, with the
inputs already on the backend's device (`glyph_engine.benchmark.unet_call`).
"""

import json
import shutil

import pytest

from glyph_engine.backends.onnx_runtime import OnnxRuntimeBackend
from glyph_engine.benchmark import unet_call
from glyph_engine.export_manifest import MANIFEST
from glyph_engine.files import sha256_file
from glyph_engine.timing import synchronized

CASES = [("tiny", 1), ("tiny", 16), ("tiny", 64), ("full", 1)]


def slimmed_copy(export_dir, target):
    """A copy of the export whose FP32 U-Net went through onnxslim (manifest updated)."""
    onnx = pytest.importorskip("onnx")
    onnxslim = pytest.importorskip("onnxslim")
    shutil.copytree(export_dir, target)
    path = target / "unet.fp32.onnx"
    onnx.save(onnxslim.slim(onnx.load(str(path))), str(path))
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["components"]["unet"]["files"]["fp32"].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (target / MANIFEST).write_text(json.dumps(manifest))
    return target


@pytest.mark.parametrize("backend_name", ["torch", "onnxruntime", "onnxruntime-slim", "openvino"])
@pytest.mark.parametrize("size, batch", CASES, ids=[f"{s}-b{b}" for s, b in CASES])
def test_unet(benchmark, bench_model, bench_backend, tmp_path, size, batch, backend_name):
    model, export_dir = bench_model(size)
    if backend_name == "onnxruntime-slim":
        # Graph clean-up stays out of the product unless this shows it beats plain ONNX Runtime.
        backend = OnnxRuntimeBackend(model, slimmed_copy(export_dir, tmp_path / "slim"), device="cpu")
    else:
        backend = bench_backend(size, backend_name)
    benchmark.group = f"U-Net {size} batch {batch}"
    benchmark.extra_info.update(images=batch, device=str(backend.device))
    benchmark.pedantic(synchronized(unet_call(model, backend, batch), backend.device), rounds=3, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
