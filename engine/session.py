"""A model loaded on a backend, ready to draw: what `generate`, serve replicas and bulk
workers share, so the three give the same glyph for the same prompt and seed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from glyph_engine import __version__
from glyph_engine.backend_factory import create_backend
from glyph_engine.backends.base import Backend
from glyph_engine.cache import ArtifactCache, default_cache_dir
from glyph_engine.checkpoint import load_model
from glyph_engine.errors import GlyphEngineError
from glyph_engine.export_manifest import default_export_dir
from glyph_engine.images import png_bytes, to_uint8
from glyph_engine.model import (
    DEFAULT_CHECKPOINT,
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    Glyffuser,
    checkpoint_path,
    missing_checkpoint,
)
from glyph_engine.pipeline import Generation, Request, generate, generate_requests
from glyph_engine.precision import choose
from glyph_engine.settings import BackendName, GenerationSettings, Precision, ResolvedSettings


@dataclass(frozen=True)
class ModelSource:
    """Which model to load and how to run it. Plain values: it travels to Ray workers."""

    ckpt: Path | None = None  # None: the embedded model
    text_encoder: str | None = None  # diffusers folders only
    backend: BackendName = BackendName.auto
    export_dir: Path | None = None  # None: beside the checkpoint
    cuda_graph: bool | None = None  # CUDA graphs; None: the backend's default (torch on CUDA: on, TensorRT: off)
    precision: Precision = Precision.auto  # the U-Net's; each backend runs what it accepts (precision.RUNS)
    cache_dir: Path | None = None  # compiled models; None: default_cache_dir()

    def check(self) -> None:
        """Refuses a source that cannot load, before anything is started."""
        if self.ckpt is None and not DEFAULT_CHECKPOINT.is_file():
            raise GlyphEngineError(
                "no model given and no embedded model installed; pass --ckpt with a glyph-engine checkpoint (.pt) "
                "or a glyffuser diffusers folder."
            )
        if self.ckpt is not None and not self.checkpoint.exists():
            raise GlyphEngineError(missing_checkpoint(self.ckpt))
        if self.backend is BackendName.tensorrt:
            choose(self.backend.value, "cuda", self.precision)  # its precisions are the same on every GPU

    # The defaults of the three paths, decided here only.
    @property
    def checkpoint(self) -> Path:
        return DEFAULT_CHECKPOINT if self.ckpt is None else checkpoint_path(self.ckpt)

    @property
    def name(self) -> str:
        """What users call the model: an embedded model's name, else the file's stem or the folder's name."""
        if self.ckpt is None:
            return DEFAULT_MODEL
        if str(self.ckpt) in EMBEDDED_MODELS and not self.ckpt.exists():
            return str(self.ckpt)
        return self.ckpt.name if self.ckpt.is_dir() else self.ckpt.stem

    @property
    def export_folder(self) -> Path:
        return self.export_dir or default_export_dir(self.checkpoint)

    @property
    def cache(self) -> ArtifactCache:
        return ArtifactCache(self.cache_dir or default_cache_dir())

    def load_model(self) -> Glyffuser:
        return load_model(self.checkpoint, self.text_encoder)


class Session:
    def __init__(self, model: Glyffuser, backend: Backend) -> None:
        self.model = model
        self.backend = backend

    @classmethod
    def load(cls, source: ModelSource, progress: bool = False, model: Glyffuser | None = None) -> Session:
        """`model`: the source's model if the caller has loaded it already (it is not read twice)."""
        model = model or source.load_model()
        backend = create_backend(
            source.backend,
            model,
            source.export_folder,
            source.cuda_graph,
            precision=source.precision,
            cache=source.cache,
            progress=progress,
        )
        return cls(model, backend)

    @property
    def max_steps(self) -> int:
        return len(self.model.alphas_cumprod)

    def generate(
        self,
        prompts: Sequence[str],
        num_per_prompt: int,
        settings: GenerationSettings | ResolvedSettings = GenerationSettings(),
        on_step: Callable[[], None] | None = None,
    ) -> Generation:
        return generate(self.model, self.backend, prompts, num_per_prompt, settings, on_step)

    def generate_requests(
        self, requests: Sequence[Request], settings: GenerationSettings | ResolvedSettings
    ) -> list[Generation]:
        """Requests in shared U-Net calls, each image as `generate` draws it for its prompt alone."""
        return generate_requests(self.model, self.backend, requests, settings)

    def metadata(self, result: Generation) -> dict[str, object]:
        """What every PNG records about how it was made: the settings it ran with, the
        precision and step that ran."""
        settings = result.settings
        return {
            "steps": settings.steps,
            "guidance": settings.guidance,
            "guidance_interval": list(settings.guidance_interval) if settings.guidance_interval else None,
            "center_noise": settings.center_noise,
            "seed": settings.seed,
            "sampler": settings.sampler.describe(settings.schedule),
            "model_sha256": self.model.sha256,
            "backend": self.backend.name,
            "precision": self.backend.precision,
            "step_impl": result.step_impl.value,
            "software": f"glyph-engine {__version__}",
        }

    def pngs(self, result: Generation, first: int = 0) -> list[bytes]:
        """Each image of `result` as PNG bytes, with its prompt, index (from `first`) and seed recorded."""
        common = self.metadata(result)
        return [
            png_bytes(pixels, {"prompt": prompt, "index": i, "image_seed": seed, **common})
            for i, (pixels, prompt, seed) in enumerate(
                zip(to_uint8(result.images), result.prompts, result.seeds, strict=True), start=first
            )
        ]
