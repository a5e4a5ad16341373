"""A warm start against the imports it cannot avoid, in paired runs.

    python bench/startup.py [--runs 5] [--out bench-results/startup.json] [generate options...]

Interleaves, `--runs` times: `python -c "import torch, openvino, numpy"`, a warm
`glyph-engine generate metal -n 1 --steps 1` and a cold one (empty compiled cache), each a
fresh process (`glyph_engine.startup`). Prints the table `bench` writes and keeps every
run's time, the CPU and its flags in the JSON. The goal (issue 27): warm within 1.5x of the
imports.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from glyph_engine.cpu import cpu_info
from glyph_engine.startup import measure_startup, startup_markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-results/startup.json"))
    args, generate_options = parser.parse_known_args()
    startup = measure_startup(generate_options, args.runs, lambda line: print(line, file=sys.stderr))
    cpu = cpu_info()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu.model, "cpu_flags": list(cpu.flags), **startup}, indent=1))
    print(f"CPU: {cpu.model}\n\n{startup_markdown(startup)}")


if __name__ == "__main__":
    main()
