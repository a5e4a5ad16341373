"""Throughput and latency of `glyph-engine serve` under concurrent clients, batching on and off,
images/s of bulk generation on 1 and 2 local Ray workers, and the U-Net's time per row
against batch size (what batching can gain on this machine at most).

    python bench/serve_load.py [--seconds 30] [--parts unet,serve,bulk] [--out docs/bench-serve.json]

Each client sends single-image requests (the served model's default steps and guidance) one after another
for `--seconds`; prompts cycle through one-word definitions, so concurrent requests differ.
"Batching off" is the same server with --max-batch-size 1: each request runs alone. One
server per setting serves every client count, after a warm-up request. Bulk runs the same
prompts file with --workers 1 and 2 (each worker gets its share of the cores); its rate is
counted from the first glyph written to the last, which leaves out Ray's and the workers'
start-up, reported beside it. The CPU is recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from glyph_engine.cpu import cpu_info
from glyph_engine.session import ModelSource
from glyph_engine.settings import GenerationSettings

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the test suite's process helpers
from serving import Server  # noqa: E402

WORDS = ["metal", "water", "fire", "wood", "grass", "heart", "speech", "fish", "bird", "horse", "stone", "tree"]


def load(server: Server, clients: int, seconds: float) -> dict[str, float]:
    def client(number: int) -> list[float]:
        latencies, i = [], 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            reply = server.post({"prompt": WORDS[(number + i) % len(WORDS)], "seed": number * 1000 + i})
            reply.raise_for_status()
            latencies.append(time.perf_counter() - start)
            i += 1
        return latencies

    before = server.metrics()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [t for result in pool.map(client, range(clients)) for t in result]
    wall = time.perf_counter() - start
    images, batches = server.batches_since(before, len(latencies))
    quantiles = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {
        "clients": clients,
        "images": len(latencies),
        "seconds": round(wall, 2),
        "images_per_s": round(len(latencies) / wall, 3),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(quantiles[18], 3),
        "mean_batch_images": round(images / max(1.0, batches), 2),  # from the server's metrics
    }


def serve_rows(seconds: float, client_counts: list[int], tmp: Path) -> list[dict[str, object]]:
    rows = []
    for batching, max_batch in (("on", "32"), ("off", "1")):
        server = Server(["--max-batch-size", max_batch, "--batch-wait-ms", "10"], tmp / f"serve-{batching}.log")
        try:
            server.wait_ready()
            server.post({"prompt": "metal"}).raise_for_status()  # warm-up
            for clients in client_counts:
                row = {"batching": batching, **load(server, clients, seconds)}
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            server.stop()
    return rows


def bulk_rows(prompts: int, tmp: Path) -> list[dict[str, object]]:
    prompts_file = tmp / "prompts.txt"
    prompts_file.write_text("\n".join(f"{WORDS[i % len(WORDS)]}" for i in range(prompts)) + "\n")
    rows = []
    for workers in (1, 2):
        out = tmp / f"bulk-{workers}"
        command = ["glyph-engine", "generate", "--prompts-file", str(prompts_file), "--out-dir", str(out), "-n", "1"]
        command += ["--ray", "local", "--workers", str(workers), "--chunk-size", "32", "-q"]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        written = sorted(p.stat().st_mtime for p in out.glob("*.png"))
        # A chunk's files land together: count from the end of the first chunk to the last file.
        first = sum(1 for t in written if t - written[0] < 0.5)
        steady = (len(written) - first) / (written[-1] - written[0]) if written[-1] > written[0] else float("nan")
        row = {
            "workers": workers,
            "images": len(written),
            "wall_s": round(wall, 2),
            "images_per_s_wall": round(len(written) / wall, 3),
            "images_per_s_steady": round(steady, 3),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def unet_rows() -> list[dict[str, float]]:
    """The default backend's U-Net time per row against batch size: what batching can gain here."""
    import torch

    from glyph_engine.session import Session

    session = Session.load(ModelSource())
    model, backend = session.model, session.backend
    tokens = model.tokenizer(["metal"], padding="longest", return_tensors="pt")
    text, mask = backend.encode_text(tokens.input_ids, tokens.attention_mask), tokens.attention_mask
    # A distilled student's U-Net takes the guidance scale as an input.
    guidance = GenerationSettings().resolve(model).guidance if model.guidance_embedding else None
    rows = []
    for batch in (1, 2, 4, 8, 16, 32, 64):
        x = torch.randn(batch, *model.image_shape)
        args = (x, 500, text.expand(batch, -1, -1), mask.expand(batch, -1), guidance)
        backend.denoise(*args)  # warm-up (and, on OpenVINO, the compile for this size)
        calls = max(4, 64 // batch)
        start = time.perf_counter()
        for _ in range(calls):
            backend.denoise(*args)
        seconds = (time.perf_counter() - start) / calls
        row = {"rows": batch, "ms_per_call": round(seconds * 1e3, 2), "ms_per_row": round(seconds * 1e3 / batch, 2)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--bulk-prompts", type=int, default=256)
    parser.add_argument("--parts", default="unet,serve,bulk", help="which measurements, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("bench-results/serve.json"))
    args = parser.parse_args()
    cpu = cpu_info()
    parts = args.parts.split(",")
    served = ModelSource()
    result: dict[str, object] = {
        "cpu": {"model": cpu.model, "cores": cpu.cores, "flags": list(cpu.flags)},
        # What the server runs: the embedded default at its own steps (requests name none).
        "model": served.name,
        "steps": GenerationSettings().resolve(served.load_model()).steps,
        "seconds_per_level": args.seconds,
    }
    with tempfile.TemporaryDirectory() as tmp:
        if "unet" in parts:
            result["unet"] = unet_rows()
        if "serve" in parts:
            result["serve"] = serve_rows(args.seconds, [int(c) for c in args.clients.split(",")], Path(tmp))
        if "bulk" in parts:
            result["bulk"] = bulk_rows(args.bulk_prompts, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
