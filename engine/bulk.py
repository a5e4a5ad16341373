"""Bulk generation: a prompts file to a folder of PNGs and a manifest, on Ray workers or here.

Glyph `index` is image `i` of line `p` of the prompts file (index = p * n + i), drawn as
`glyph-engine generate PROMPT -n n --seed SEED` draws its image i, and written as
`{index:06d}.png`. The folder's `manifest.jsonl` starts with the job (model, prompts and
settings) and gets one line per finished glyph (prompt, seed, index, file, sha256), written
after its file. A re-run of the same job skips glyphs whose file matches its line and redoes
the rest; a different job in the same folder is refused. The manifest is untrusted input on a
re-run: only a line exactly as this job would write it, for a regular file in the folder,
counts; nothing outside `--out-dir` is read or written, and symlinks there are refused.

On Ray, each worker is an actor that loads the model once and draws chunks of glyphs.
Ray restarts a killed worker and runs its chunk again (`MAX_RETRIES`); the driver alone
writes files, so a lost chunk leaves nothing behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from glyph_engine.commands import MAX_IMAGES
from glyph_engine.errors import GlyphEngineError
from glyph_engine.files import atomic_path, read_regular_file
from glyph_engine.model import Glyffuser
from glyph_engine.pipeline import Request
from glyph_engine.ray_cluster import first_line, ray_init
from glyph_engine.session import ModelSource, Session
from glyph_engine.settings import GenerationSettings, ResolvedSettings
from glyph_engine.text import PromptTokenizer, check_prompts

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
FORMAT = 1
MAX_RETRIES = 3  # runs of one chunk on restarted workers before the job stops
MAX_PROMPTS = 1_000_000


@dataclass(frozen=True)
class BulkJob:
    prompts_file: Path
    out_dir: Path
    num_images: int  # per prompt
    settings: GenerationSettings
    source: ModelSource
    ray_address: str | None = None  # None: in this process; "local": start Ray here; else join this cluster
    workers: int | None = None  # Ray workers; None: one per node (a local Ray: one)
    worker_gpus: float = 0.0
    chunk_images: int = 64  # glyphs per task; a killed worker loses at most this much work
    progress: bool = False


@dataclass(frozen=True)
class Glyph:
    index: int
    prompt: str
    image: int  # the image's number within its prompt (generate's image i)
    seed: int  # this image's noise seed

    @property
    def file(self) -> str:
        return f"{self.index:06d}.png"

    def record(self, sha256: str) -> dict[str, object]:
        """Its manifest line, once its file with this sha256 is written."""
        return {**asdict(self), "file": self.file, "sha256": sha256}


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and a leading byte-order mark are skipped."""
    try:
        # utf-8-sig: editors on Windows start UTF-8 files with a BOM, which is no part of the first prompt.
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise GlyphEngineError(f"--prompts-file {path} does not exist.") from None
    except UnicodeDecodeError:
        raise GlyphEngineError(f"--prompts-file {path} is not UTF-8 text.") from None
    except OSError as e:
        raise GlyphEngineError(f"cannot read --prompts-file {path}: {e.strerror}.") from None
    # Lines end in \n or \r\n (strip() takes the \r). Not str.splitlines: it also splits at form
    # feeds, U+2028 and other characters that editors show inside one line.
    prompts = [line.strip() for line in text.split("\n") if line.strip()]
    if not prompts:
        raise GlyphEngineError(f"--prompts-file {path} has no prompts; write one prompt per line.")
    if len(prompts) > MAX_PROMPTS:
        raise GlyphEngineError(f"--prompts-file {path} has over {MAX_PROMPTS} prompts; split it into several jobs.")
    check_prompts(prompts)
    return prompts


def plan(prompts: Sequence[str], num_images: int, seed: int) -> list[Glyph]:
    from glyph_engine.pipeline import image_seeds

    seeds = image_seeds(seed, num_images)
    return [
        Glyph(p * num_images + i, prompt, i, seeds[i]) for p, prompt in enumerate(prompts) for i in range(num_images)
    ]


def job_header(job: BulkJob, prompts: Sequence[str], model_sha256: str) -> dict[str, object]:
    """What identifies the job: glyphs from another job must not be mixed into this folder."""
    settings = asdict(job.settings)
    settings.pop("batch_size")  # how the work is split does not change a glyph
    settings.pop("step_impl")
    return {
        "format": FORMAT,
        "model_sha256": model_sha256,
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "prompts": len(prompts),
        "num_images": job.num_images,
        "settings": json.loads(json.dumps(settings, default=str)),
    }


def finished(out_dir: Path, header: dict[str, object], glyphs: Sequence[Glyph]) -> dict[int, dict[str, object]]:
    """The glyphs of the job planned as `glyphs` that `out_dir` already holds: index -> manifest line.

    The manifest is untrusted (edited, damaged, or from a killed run): a line counts only if it is
    exactly the line this job writes for one of its glyphs, and that glyph's own file in `out_dir`
    (never a path the line names) is a regular file with the line's sha256. Other lines are ignored,
    so their glyphs are drawn again.
    """
    by_index = {glyph.index: glyph for glyph in glyphs}
    _refuse_symlinks(out_dir, {MANIFEST, *(glyph.file for glyph in glyphs)})
    path = out_dir / MANIFEST
    if not path.exists():
        if any(out_dir.glob("*.png")):
            raise GlyphEngineError(f"--out-dir {out_dir} holds PNGs but no {MANIFEST}; give an empty or new folder.")
        return {}
    data = read_regular_file(path)
    if data is None:
        raise _not_a_file(path)
    first, _, rest = data.partition(b"\n")
    found = _json_object(first)
    if found is None or not isinstance(found.get("job"), dict):
        raise GlyphEngineError(
            f"the first line of {path} is damaged, so which job --out-dir holds is unknown; give a new folder, "
            f"or delete its {MANIFEST} and PNGs to start over."
        )
    if _canonical(found["job"]) != _canonical(header):
        raise GlyphEngineError(
            f"--out-dir {out_dir} holds another job (its {MANIFEST} names a different model, prompts or settings); "
            "give a new folder, or the same options as before to resume."
        )
    digests: dict[int, str | None] = {}  # each file is hashed once, however many lines name its glyph
    done = {}
    for raw in rest.split(b"\n"):
        record = _json_object(raw)  # None for a line cut short when a run was killed
        index = record.get("index") if record is not None else None
        if type(index) is not int or index not in by_index:  # type(): a JSON true is no index
            continue
        glyph, digest = by_index[index], record.get("sha256")
        if not isinstance(digest, str) or _canonical(record) != _canonical(glyph.record(digest)):
            continue
        if index not in digests:
            content = read_regular_file(out_dir / glyph.file)
            digests[index] = None if content is None else hashlib.sha256(content).hexdigest()
        if digests[index] == digest:
            done[index] = glyph.record(digest)
    return done


def _json_object(line: bytes) -> dict | None:
    try:
        value = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8 or not JSON; nested too deep for the parser
        return None
    return value if isinstance(value, dict) else None


def _canonical(value: object) -> str:
    """`value` as JSON with sorted keys: equal only for equal types too (to ==, true is 1 and 4.0 is 4)."""
    return json.dumps(value, sort_keys=True)


def _refuse_symlinks(out_dir: Path, names: set[str]) -> None:
    # A link would make the job read a file elsewhere as its own, or write through it to that file.
    with os.scandir(out_dir) as entries:
        for entry in entries:
            if entry.name in names and entry.is_symlink():
                raise _symlink_refused(out_dir / entry.name)


def _symlink_refused(path: Path) -> GlyphEngineError:
    return GlyphEngineError(
        f"{path} is a symbolic link; a bulk job reads and writes only regular files in its --out-dir: "
        "remove the link, or give another folder."
    )


def _not_a_file(path: Path) -> GlyphEngineError:
    return GlyphEngineError(f"{path} is not a regular file; move it out of --out-dir, or give another folder.")


def _open_for_append(path: Path) -> TextIO:
    """The manifest, opened to append lines: O_NOFOLLOW, so a manifest swapped for a symlink since
    `finished` checked it fails here rather than redirecting the lines to the link's target."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _symlink_refused(path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _not_a_file(path)
    return os.fdopen(fd, "a", encoding="utf-8")


@contextmanager
def _out_dir_errors(out_dir: Path) -> Iterator[None]:
    """What the file system refuses in --out-dir (read-only, below a file, /proc) as one line."""
    try:
        yield
    except OSError as e:
        raise GlyphEngineError(
            f"cannot write in --out-dir {out_dir} ({e.strerror or e}); give a folder on a disk you can write to."
        ) from None


def _chunks(tokenizer: PromptTokenizer, todo: Sequence[Glyph], size: int) -> Iterator[list[Glyph]]:
    """Glyphs to draw, in chunks of `size`, prompts of one token length together (they share U-Net calls)."""
    prompts = list(dict.fromkeys(g.prompt for g in todo))
    if not prompts:
        return
    lengths = dict(zip(prompts, tokenizer(prompts)[1].sum(1).tolist(), strict=True))
    ordered = sorted(todo, key=lambda g: (lengths[g.prompt], g.index))
    for start in range(0, len(ordered), size):
        yield ordered[start : start + size]


def requests_of(chunk: Sequence[Glyph], seed: int) -> list[Request]:
    """The chunk as requests: each a run of consecutive images of one prompt."""
    requests: list[Request] = []
    for glyph in chunk:
        last = requests[-1] if requests else None
        if last and last.prompt == glyph.prompt and last.first + last.count == glyph.image:
            requests[-1] = Request(last.prompt, last.count + 1, seed, last.first)
        else:
            requests.append(Request(glyph.prompt, 1, seed, glyph.image))
    return requests


class ChunkWorker:
    """Holds the model once and draws chunks: requests in, one PNG per image out, in order."""

    def __init__(self, source: ModelSource, settings: ResolvedSettings, model: Glyffuser | None = None) -> None:
        self._session = Session.load(source, model=model)
        self._settings = settings

    def run(self, requests: Sequence[Request]) -> list[bytes]:
        results = self._session.generate_requests(requests, self._settings)
        return [
            png
            for request, result in zip(requests, results, strict=True)
            for png in self._session.pngs(result, first=request.first)
        ]


def run_bulk(job: BulkJob) -> list[str]:
    """Runs (or resumes) the job; returns what to tell the user."""
    prompts = read_prompts(job.prompts_file)
    if job.out_dir.exists() and not job.out_dir.is_dir():
        raise GlyphEngineError(f"--out-dir {job.out_dir} exists and is not a folder.")
    if job.workers is not None and job.workers < 1:
        raise GlyphEngineError(f"--workers must be at least 1 (got {job.workers}).")
    if job.chunk_images < 1:
        raise GlyphEngineError(f"--chunk-size must be at least 1 (got {job.chunk_images}).")
    if not 1 <= job.num_images <= MAX_IMAGES:
        raise GlyphEngineError(f"-n must be from 1 to {MAX_IMAGES} glyphs per prompt (got {job.num_images}).")
    job.source.check()
    # The driver needs the tokenizer and the model's identity; without Ray it also runs this model.
    model = job.source.load_model()
    settings = job.settings.resolve(model)
    header = job_header(job, prompts, model.sha256)
    glyphs = plan(prompts, job.num_images, settings.seed)
    manifest = job.out_dir / MANIFEST
    with _out_dir_errors(job.out_dir):
        job.out_dir.mkdir(parents=True, exist_ok=True)
        done = finished(job.out_dir, header, glyphs)
        if not manifest.exists():
            with atomic_path(manifest, follow_symlinks=False) as tmp:
                tmp.write_text(json.dumps({"job": header}) + "\n")
    todo = [g for g in glyphs if g.index not in done]
    chunks = list(_chunks(model.prompt_tokenizer, todo, job.chunk_images))
    with _out_dir_errors(job.out_dir):
        log = _open_for_append(manifest)
    with (
        log,
        tqdm(
            total=len(glyphs), initial=len(done), desc="glyphs", unit="glyph", file=sys.stderr, disable=not job.progress
        ) as bar,
    ):

        def write(chunk: Sequence[Glyph], pngs: Sequence[bytes]) -> None:
            with _out_dir_errors(job.out_dir):
                for glyph, png in zip(chunk, pngs, strict=True):
                    with atomic_path(job.out_dir / glyph.file, follow_symlinks=False) as tmp:
                        tmp.write_bytes(png)
                    done[glyph.index] = glyph.record(hashlib.sha256(png).hexdigest())
                    log.write(json.dumps(done[glyph.index]) + "\n")
                log.flush()
                os.fsync(log.fileno())  # a line is only trusted once its file is on disk
            bar.update(len(chunk))

        if chunks:
            if job.ray_address is None:
                worker = ChunkWorker(job.source, settings, model)  # the model read above
                for chunk in chunks:
                    write(chunk, worker.run(requests_of(chunk, settings.seed)))
            else:
                _run_on_ray(job, settings, chunks, write)
    with _out_dir_errors(job.out_dir):
        _compact(manifest, header, done)
    return [f"wrote {len(todo)} glyphs to {job.out_dir} ({len(done) - len(todo)} were already there); see {manifest}"]


def _compact(manifest: Path, header: dict[str, object], done: dict[int, dict[str, object]]) -> None:
    """Rewrites the manifest in index order, one line per glyph, once every glyph is there."""
    with atomic_path(manifest, follow_symlinks=False) as tmp:
        tmp.write_text("".join(json.dumps(line) + "\n" for line in [{"job": header}, *(done[i] for i in sorted(done))]))


def _run_on_ray(
    job: BulkJob,
    settings: ResolvedSettings,
    chunks: list[list[Glyph]],
    write: Callable[[Sequence[Glyph], Sequence[bytes]], None],
) -> None:
    try:
        import ray
    except ImportError:
        raise GlyphEngineError("--ray needs Ray: pip install 'glyph-engine[serve]'.") from None
    ray_init(None if job.ray_address == "local" else job.ray_address)
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        count = job.workers or (1 if job.ray_address == "local" else len(alive))
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // count)
        Worker = ray.remote(ChunkWorker).options(
            num_cpus=cpus,
            num_gpus=job.worker_gpus,
            max_restarts=MAX_RETRIES,
            max_task_retries=MAX_RETRIES,
            scheduling_strategy="SPREAD",
        )
        workers = [Worker.remote(job.source, settings) for _ in range(count)]
        queue = deque(chunks)
        pending = {}
        # Two chunks per worker: the next one is already there when one finishes.
        for worker in workers * 2:
            if queue:
                chunk = queue.popleft()
                pending[worker.run.remote(requests_of(chunk, settings.seed))] = (worker, chunk)
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            worker, chunk = pending.pop(ready)
            try:
                pngs = ray.get(ready)
            except ray.exceptions.RayTaskError as e:  # the worker ran and raised: retrying would too
                reason = e.cause if isinstance(e.cause, GlyphEngineError) else first_line(e)
                raise GlyphEngineError(
                    f"a chunk of {len(chunk)} glyphs failed: {reason} The glyphs written so far are kept."
                ) from None
            except ray.exceptions.RayError as e:  # the worker died again and again
                raise GlyphEngineError(
                    f"a chunk of {len(chunk)} glyphs was lost {MAX_RETRIES + 1} times ({type(e).__name__}); "
                    "the glyphs written so far are kept: run the same command again to resume."
                ) from None
            write(chunk, pngs)
            if queue:
                chunk = queue.popleft()
                pending[worker.run.remote(requests_of(chunk, settings.seed))] = (worker, chunk)
    finally:
        ray.shutdown()
