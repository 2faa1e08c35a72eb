"""The package layout: no import cycle, no private names across modules, small modules, a light
``import legrad``, an engine that depends on nothing but torch and the ops, and declared dependencies
that are all used. Static checks of the source (ast), so they fail as soon as a module breaks a rule."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "legrad"
MAX_LINES = 450
HEAVY = ("tqdm", "matplotlib", "gradio", "cv2", "transformers")


def _files() -> dict[str, Path]:
    """Module name -> path, for every module of the package."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _files()


def _package(name: str) -> str:
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def _resolve(name: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = _package(name).split(".")
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str, top_level_only: bool) -> list[tuple[str, list[str]]]:
    """``(module, imported names)`` of every import of a module (optionally only the module-level ones)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.append((_resolve(name, node), [a.name for a in node.names]))
    return out


def _targets(name: str, top_level_only: bool = True) -> set[str]:
    """The legrad modules a module imports (``from pkg import submodule`` counts as the submodule)."""
    out = set()
    for mod, names in _imports(name, top_level_only):
        for n in names:
            if f"{mod}.{n}" in MODULES:
                out.add(f"{mod}.{n}")
        if mod in MODULES:
            out.add(mod)
    return out - {name}


def test_no_import_cycle():
    graph = {name: _targets(name) for name in MODULES}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack else f"{node}->{nxt}")
            elif nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, cycles


def test_every_legrad_import_exists():
    """An import of a module that is not in the tree (a stale path) would be found elsewhere or fail late."""
    missing = []
    for name in MODULES:
        for mod, _ in _imports(name, top_level_only=False):
            if mod == "legrad" or not mod.startswith("legrad."):
                continue
            if mod not in MODULES:
                missing.append(f"{name} imports {mod}")
    assert not missing, missing


def test_no_private_names_across_modules():
    problems = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_aliases = set()
        for mod, names in _imports(name, top_level_only=False):
            if not mod.startswith("legrad"):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(f"{name} imports {private} from {mod}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("legrad")):
                base = _resolve(name, node)
                module_aliases |= {a.asname or a.name for a in node.names if f"{base}.{a.name}" in MODULES}
            elif isinstance(node, ast.Import):
                module_aliases |= {a.asname for a in node.names if a.asname and a.name.startswith("legrad")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                problems.append(f"{name} reads {node.value.id}.{node.attr}")
    assert not problems, problems


def _tracked_python_files() -> list[Path]:
    """Every .py file git tracks in the repository (the package, tests, scripts, benches, app.py...)."""
    out = subprocess.run(["git", "ls-files", "-z", "--", "*.py"], cwd=REPO, capture_output=True, timeout=60)
    if out.returncode != 0:  # not a git checkout (e.g. an unpacked sdist): every .py file under the repo
        return [p for p in REPO.rglob("*.py") if not {".venv", "build", "__pycache__"} & set(p.parts)]
    return [REPO / name for name in out.stdout.decode().split("\0") if name and (REPO / name).is_file()]


def test_modules_are_small():
    files = _tracked_python_files()
    assert {REPO / "app.py", REPO / "tests" / "test_layout.py", *MODULES.values()} <= set(files)
    big = {str(path.relative_to(REPO)): n for path in files
           if (n := path.read_text(encoding="utf-8").count("\n")) > MAX_LINES}
    assert not big, big


def test_gradio_only_in_the_app_page_and_only_lazily():
    """Only the app's page (``legrad.app.page``) imports gradio, inside its functions; the request logic
    (``legrad.app.requests``), the flags and everything else import without it."""
    offending = [f"{name} imports {mod}" for name in MODULES for mod, _ in _imports(name, top_level_only=False)
                 if mod.split(".")[0] == "gradio" and name != "legrad.app.page"]
    offending += [f"legrad.app.page imports {mod} at module level" for mod, _ in
                  _imports("legrad.app.page", top_level_only=True) if mod.split(".")[0] == "gradio"]
    assert not offending, offending


_CORE = ("legrad.adapters", "legrad.engine", "legrad.ops")
_FACADE = ("legrad.wrapper", "legrad.answers", "legrad.classifiers", "legrad.preprocess", "legrad.pretrained")
_MODEL_LIBS = {"torch", "open_clip", "timm", "transformers", "torchvision"}
_IMAGES = {"numpy", "PIL"}

# Every module of the package, lowest layer first: (layer, the legrad layers it may import, the third-party
# libraries it may import). `legrad` itself is the package's __init__ only (lazy exports by name).
LAYERS = [
    ("legrad.ops", ("legrad.ops",), {"torch"}),
    ("legrad.engine", ("legrad.engine", "legrad.ops"), {"torch"}),
    ("legrad.adapters", _CORE, _MODEL_LIBS),
    # The public facade modules sit on the core and never reach the front ends either.
    ("legrad.wrapper", (*_CORE, "legrad.answers"), {"torch"}),
    ("legrad.answers", _CORE, {"torch"}),
    ("legrad.classifiers", _CORE, {"torch"}),
    ("legrad.preprocess", (), {"torch", "torchvision"}),
    ("legrad.pretrained", _CORE, {"open_clip"}),
    # Explanation methods as peers (LeGrad and the baselines), on the facade; targets as types.
    ("legrad.methods", ("legrad.methods", *_CORE, *_FACADE), {"torch"}),
    # Adapters for the toolkits people evaluate with (Quantus); they import no toolkit.
    ("legrad.interop", ("legrad.interop", "legrad.methods", *_CORE, *_FACADE), {"torch", "numpy"}),
    ("legrad", (), set()),
    ("legrad.toy", ("legrad.toy", "legrad.preprocess"), {"torch", "open_clip", *_IMAGES}),
    # Reading and writing (files, image decoding, URLs): below every upper layer, above nothing.
    ("legrad.io", ("legrad.io",), _IMAGES),
    ("legrad.viz", ("legrad.viz", "legrad.io", "legrad.preprocess"),
     {"torch", "matplotlib", "cv2", "IPython", *_IMAGES}),
    ("legrad.eval", ("legrad.eval", "legrad.io", "legrad.toy", "legrad.methods", *_CORE, *_FACADE),
     {"torch", "tqdm", *_IMAGES}),
    # The front ends' shared helpers: model loading and the Explainer; no overlays, app, CLI or extraction.
    ("legrad.frontend", ("legrad.frontend", "legrad.io", "legrad.toy", "legrad", "legrad.methods", *_CORE, *_FACADE),
     {"huggingface_hub", "tqdm", *_MODEL_LIBS, *_IMAGES}),
    ("legrad.extract", ("legrad.extract", "legrad.frontend", "legrad.io", *_CORE, *_FACADE),
     {"torch", "tqdm", *_IMAGES}),
    # The demo app sits on top: the front-end helpers, the overlays and the method registry (its method
    # choice), never the command line.
    ("legrad.app", ("legrad.app", "legrad.frontend", "legrad.io", "legrad.toy", "legrad.viz", "legrad.engine",
                    "legrad.methods"),
     {"gradio", "torch", *_IMAGES}),
    ("legrad.cli", ("legrad.cli", "legrad.app", "legrad.extract", "legrad.eval", "legrad.frontend", "legrad.viz",
                    "legrad.io", "legrad.toy", "legrad", "legrad.methods", *_CORE, *_FACADE),
     {"torch", "tqdm", *_IMAGES}),
    ("legrad.__main__", ("legrad.cli",), set()),
]


def _layer_of(name: str) -> str | None:
    """The layer a module belongs to: the longest matching prefix (``legrad`` matches only itself)."""
    found = [layer for layer, _, _ in LAYERS if name == layer or (layer != "legrad" and name.startswith(layer + "."))]
    return max(found, key=len) if found else None


def test_every_module_is_in_a_layer():
    """A new subpackage or top-level module must be given its place in :data:`LAYERS`."""
    assert not [name for name in MODULES if _layer_of(name) is None]
    assert [layer for layer, _, _ in LAYERS if layer not in MODULES] == []


@pytest.mark.parametrize("layer, allowed, third_party", LAYERS, ids=[layer for layer, _, _ in LAYERS])
def test_layers_import_only_what_is_below_them(layer, allowed, third_party):
    """The engine imports torch and the ops; adapters import the engine and the ops; nothing imports up
    (lazy imports inside functions included), and each layer only the third-party libraries of its job."""
    bad = []
    for name in MODULES:
        if _layer_of(name) != layer:
            continue
        for mod, _ in _imports(name, top_level_only=False):
            top = mod.split(".")[0]
            if mod.startswith("legrad"):
                if not any(mod == a or (a != "legrad" and mod.startswith(a + ".")) for a in allowed):
                    bad.append(f"{name} imports {mod}")
            elif top not in sys.stdlib_module_names and top not in third_party and top != "__future__":
                bad.append(f"{name} imports {mod}")
    assert not bad, bad


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


@pytest.mark.subprocess
def test_import_legrad_is_light():
    loaded = _loaded_after("import legrad")
    assert not loaded & {*HEAVY, "torch", "open_clip"}, loaded & {*HEAVY, "torch", "open_clip"}
    loaded = _loaded_after("import legrad.cli, legrad.toy")
    assert "torch" not in loaded
    # The engine adds no heavy library to what torch itself loads (some torch builds import tqdm).
    extra = _loaded_after("from legrad import LeWrapper, TowerAdapter, register_tower, register_attention_ops")
    extra -= _loaded_after("import torch")
    assert not extra & set(HEAVY), extra & set(HEAVY)


def test_public_names_and_version():
    import legrad
    from legrad.adapters.base import TowerAdapter
    from legrad.engine.step import LayerStep
    from legrad.ops.attention import register_attention_ops

    assert legrad.TowerAdapter is TowerAdapter and legrad.LayerStep is LayerStep
    assert legrad.register_attention_ops is register_attention_ops
    assert set(legrad.__all__) >= {"LeWrapper", "LePreprocess", "list_pretrained", "register_tower", "TowerAdapter",
                                   "LayerStep", "supported_tower_names", "register_attention_ops", "__version__"}
    tree = ast.parse((PKG / "__init__.py").read_text(encoding="utf-8"))
    literal = [n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "__version__"]
    assert literal and isinstance(literal[0].value, ast.Constant)  # setuptools reads it statically


# distribution -> import name, for the declared dependencies whose names differ
_IMPORT_NAMES = {"open_clip_torch": "open_clip", "pillow": "PIL", "opencv-python": "cv2"}


def test_every_declared_dependency_is_imported():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    imported = {mod.split(".")[0] for name in MODULES for mod, _ in _imports(name, top_level_only=False)}
    unused = []
    for dep in deps:
        dist = dep.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            dist = dist.split(sep)[0]
        if _IMPORT_NAMES.get(dist.lower(), dist.lower()) not in imported:
            unused.append(dist)
    assert not unused, unused
