"""The layout a newcomer can draw, checked: dependencies run one way.

cpp_ext (leaf: raw tensors and floats)
   ^
glyph_engine runtime (engine/: model, sampler, pipeline, backends, commands)
   ^                         ^
glyph_engine.export      glyph_engine.training (dataset, train, eval)
   ^                         ^
glyph_engine.cli (wires everything together)
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name a file imports, at top level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def offenders(paths: list[Path], forbidden: str) -> list[str]:
    return [
        f"{p.relative_to(ROOT)} imports {name}"
        for p in paths
        for name in sorted(imported_modules(p))
        if name == forbidden or name.startswith(forbidden + ".")
    ]


def test_cpp_ext_is_a_leaf():
    assert offenders(files("cpp_ext"), "glyph_engine") == []


# The CLI and `python -m glyph_engine` (which runs it) are the top layer.
RUNTIME = [p for p in files("engine") if "training" not in p.parts and p.name not in ("cli.py", "__main__.py")]


@pytest.mark.parametrize("upper", ["glyph_engine.export", "glyph_engine.training", "glyph_engine.cli"])
def test_the_runtime_never_imports_the_layers_above_it(upper):
    assert offenders(RUNTIME, upper) == []


@pytest.mark.parametrize(
    "folder, upper", [("export", "glyph_engine.training"), ("engine/training", "glyph_engine.export")]
)
def test_export_and_training_stay_apart(folder, upper):
    assert offenders(files(folder), upper) == [] and offenders(files(folder), "glyph_engine.cli") == []


def test_test_helpers_live_in_tests_and_tests_import_no_test_module():
    assert not (ROOT / "engine" / "testing.py").exists()
    test_modules = {p.stem for p in files("tests") + files("bench") if p.stem.startswith(("test_", "bench_"))}
    found = [
        f"{p.relative_to(ROOT)} imports {name}"
        for p in files("tests") + files("bench")
        for name in imported_modules(p)
        if name.split(".")[0] in test_modules
    ]
    assert found == []


# Backends load and run; building (openvino_build), gating (quality) and choosing
# (backend_factory) sit above them, and the pipeline drives them, never the other way.
@pytest.mark.parametrize(
    "upper",
    [
        "glyph_engine.pipeline",
        "glyph_engine.quality",
        "glyph_engine.openvino_build",
        "glyph_engine.backend_factory",
        "glyph_engine.session",
    ],
)
def test_backends_only_load_and_run(upper):
    assert offenders(files("engine/backends"), upper) == []


# What a script outside the package may use: the library as README documents it. The bench
# scripts are held to it, so they measure what users run, not internals.
PUBLIC_MODULES = {
    "glyph_engine",
    "glyph_engine.cpp_ext",
    "glyph_engine.session",
    "glyph_engine.settings",
    "glyph_engine.samplers",
    "glyph_engine.sampler",
    "glyph_engine.schedule",
    "glyph_engine.step",
    "glyph_engine.backends.base",
    "glyph_engine.benchmark",
    "glyph_engine.startup",
    "glyph_engine.peer",
    "glyph_engine.timing",
    "glyph_engine.checkpoint",
    "glyph_engine.model",
    "glyph_engine.cpu",
    "glyph_engine.quality",
    "glyph_engine.images",
    # What `--backend inductor` compiles (`unet_module`), for its profile, beside the
    # export's own U-Net wrapper (the model as diffusers runs it).
    "glyph_engine.inductor_build",
    "glyph_engine.to_onnx",
    # Which GroupNorm form the OpenVINO U-Net graph takes (`graph_form`), set by
    # bench/group_norm_forms.py to time both forms through the engine's own route.
    "glyph_engine.openvino_build",
    # The radical evaluation and the student's gate, as `eval` runs them.
    "glyph_engine.training.dataset",
    "glyph_engine.training.evaluate",
    "glyph_engine.training.student_gate",
    # The first halving's teacher as distill samples it (bench/midpoint_teacher.py), with the
    # pipeline's prompt encoding.
    "glyph_engine.pipeline",
    "glyph_engine.training.distill_targets",
    # distill's own batches and targets, for its per-step losses (bench/distill_step_losses.py).
    "glyph_engine.training.distill",
    "glyph_engine.training.distill_config",
}


def glyph_engine_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every `from glyph_engine... import name` and `import glyph_engine...`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("glyph_engine"):
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.startswith("glyph_engine")]
    return found


def test_bench_uses_only_the_public_api():
    private = [
        f"{p.relative_to(ROOT)}: {module} {name}".strip()
        for p in files("bench")
        for module, name in glyph_engine_imports(p)
        if module not in PUBLIC_MODULES or name.startswith("_")
    ]
    assert private == []
