"""The peer as a whole process: the glyffuser's own sampling loop on a teacher's weights.

    python bench/peer_process.py [--ckpt glyffuser-small] [-n 64] [--steps 20] [--guidance G]

The loop is `glyph_engine.peer` (the one every speed claim is measured against), here in a
process of its own so that `bench/wall_clock.py` times it as it times `glyph-engine
generate`: imports, model loading and sampling. Guidance defaults to the checkpoint's, as
generate's does; at any scale but 1 the batch is doubled at every step. The checkpoint is a
teacher (the glyffuser loop cannot run a distilled student): by default the embedded
glyffuser-small, which every embedded student was distilled from.
"""

from __future__ import annotations

import argparse

import torch

from glyph_engine.checkpoint import load_model
from glyph_engine.model import TEACHER_MODEL
from glyph_engine.peer import Peer
from glyph_engine.settings import DEFAULT_STEPS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", default=TEACHER_MODEL, help="a teacher: checkpoint, folder or embedded name")
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--prompt", default="metal")
    parser.add_argument("--guidance", type=float, default=None, help="default: the checkpoint's, as generate")
    args = parser.parse_args()

    model = load_model(args.ckpt)
    if model.guidance_embedding:
        parser.error(f"{args.ckpt} is a distilled student: the peer runs its teacher, e.g. --ckpt {TEACHER_MODEL}")
    guidance = model.default_guidance if args.guidance is None else args.guidance
    noise = torch.randn(args.n, *model.image_shape, generator=torch.Generator().manual_seed(0))
    image = Peer(model).generate([args.prompt] * args.n, noise, args.steps, guidance)
    print(f"peer: {args.n} glyphs at guidance {guidance:g}, mean pixel {image.mean():.3f}")


if __name__ == "__main__":
    main()
