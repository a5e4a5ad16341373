"""U-Net throughput (images/s) per backend and batch on this machine.

`pytest bench/bench_unet.py --benchmark-only`; each call is one U-Net evaluation of `batch`
images at text length 16, through the same Backend.denoise that generation uses, with the
inputs already on the backend's device (`glyph_engine.benchmark.unet_call`).
"""

import hashlib
import json
import shutil

import pytest

from glyph_engine.benchmark import unet_call
from glyph_engine.session import ModelSource, Session
from glyph_engine.timing import synchronized

CASES = [("tiny", 1), ("tiny", 16), ("tiny", 64), ("full", 1)]


def slimmed_copy(export_dir, target):
    """A copy of the export whose FP32 U-Net went through onnxslim (manifest updated)."""
    onnx = pytest.importorskip("onnx")
    onnxslim = pytest.importorskip("onnxslim")
    shutil.copytree(export_dir, target)
    manifest_path = target / "manifest.json"  # the export's documented manifest
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["components"]["unet"]["files"]["fp32"]
    path = target / entry["path"]
    onnx.save(onnxslim.slim(onnx.load(str(path))), str(path))
    entry.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    manifest_path.write_text(json.dumps(manifest))
    return target


@pytest.mark.parametrize("backend_name", ["torch", "onnxruntime", "onnxruntime-slim", "openvino"])
@pytest.mark.parametrize("size, batch", CASES, ids=[f"{s}-b{b}" for s, b in CASES])
def test_unet(benchmark, bench_model, bench_backend, tmp_path, size, batch, backend_name):
    model, export_dir = bench_model(size)
    if backend_name == "onnxruntime-slim":
        # Graph clean-up stays out of the product unless this shows it beats plain ONNX Runtime.
        slim = slimmed_copy(export_dir, tmp_path / "slim")
        source = ModelSource(backend="onnxruntime", precision="fp32", export_dir=slim)  # the file slimmed
        backend = Session.load(source, model=model).backend
    else:
        backend = bench_backend(size, backend_name)
    benchmark.group = f"U-Net {size} batch {batch}"
    benchmark.extra_info.update(images=batch, device=str(backend.device))
    benchmark.pedantic(synchronized(unet_call(model, backend, batch), backend.device), rounds=3, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
