"""Starting or joining Ray, shared by `serve` and bulk generation."""

from __future__ import annotations

from glyph_engine.errors import GlyphEngineError


def ray_init(address: str | None, metrics_port: int | None = None) -> None:
    """Joins the Ray cluster at `address`, or starts a local Ray in this process."""
    import ray

    try:
        if address is None:
            ray.init(
                include_dashboard=False,
                _metrics_export_port=metrics_port,
                log_to_driver=False,
                configure_logging=False,
            )
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise GlyphEngineError(f"could not start or reach {where}: {first_line(e)}") from None


def first_line(e: BaseException) -> str:
    """The line of a (Ray-wrapped) error that says what went wrong: its last non-empty one."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(e).__name__
