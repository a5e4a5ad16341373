"""One request's glyphs from a service, its failures as refusals: what every route
(`/generate`, the OpenAI route) does the same way and replies to in its own shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from glyph_engine.errors import GlyphEngineError
from glyph_engine.pipeline import Generation
from glyph_engine.pipeline import Request as GlyphRequest
from glyph_engine.serve.batcher import BatchKey, GuidanceTooStrong, Overloaded

if TYPE_CHECKING:
    from glyph_engine.serve.api import Service


@dataclass(frozen=True)
class Refusal:
    status: int  # 422: the client's guidance; 503: overloaded; 500: the run failed
    message: str  # a sentence, ending in a full stop
    headers: dict[str, str] | None = None


async def draw(
    service: Service, prompt: str, n: int, seed: int, steps: int | None, guidance: float | None
) -> Generation | Refusal:
    """The glyphs, batched with other requests of the same steps and guidance."""
    key = BatchKey(steps or service.default_steps, guidance)
    try:
        return await service.generate(GlyphRequest(prompt, n, seed), key)
    except Overloaded as e:
        return Refusal(503, f"{e}.", {"Retry-After": str(e.retry_after)})
    except GuidanceTooStrong as e:
        return Refusal(422, f"{e}.")
    except GlyphEngineError as e:
        return Refusal(500, str(e))
    except Exception as e:  # noqa: BLE001 - the batcher logged it; this run's clients get JSON, not a traceback
        return Refusal(500, f"sampling failed ({type(e).__name__}: {e}); the server log has the details.")
