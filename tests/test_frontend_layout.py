"""The front-end layout: compatibility aliases resolve to the same objects, one URL test, and the engine never
imports the front ends (static checks of the source, so they fail as soon as a module breaks the rule)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "legrad"
# Packages that are front ends (or use them); everything else under legrad/ is the engine and its adapters.
FRONT = {"frontend", "viz", "cli", "extract", "eval", "toy"}
FRONT_LIBRARIES = {"matplotlib", "cv2", "gradio", "tqdm"}


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _is_alias(tree: ast.Module) -> bool:
    doc = ast.get_docstring(tree) or ""
    return doc.startswith("Alias of")


def _imported(path: Path, tree: ast.Module) -> set[str]:
    """Absolute names of every module imported anywhere in the file (lazy imports included)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def test_aliases_resolve_to_the_front_end_objects():
    import legrad.explainer
    import legrad.loading
    import legrad.viz
    import utils
    from legrad.frontend import errors, explainer, files, images, logs, models, options, scenes

    same = {
        "ModelLoadError": errors.ModelLoadError, "ImageLoadError": errors.ImageLoadError,
        "ImageTooLargeError": errors.ImageTooLargeError, "load_model": models.load_model,
        "default_layer_index": models.default_layer_index, "native_image_size": models.native_image_size,
        "resolve_device": models.resolve_device, "model_choices": models.model_choices, "TOY_NAME": models.TOY_NAME,
        "load_image": images.load_image, "MAX_IMAGE_PIXELS": images.MAX_IMAGE_PIXELS,
        "parse_size": options.parse_size, "configure_logging": logs.configure_logging,
        "absent_phrase": scenes.absent_phrase, "sample_scenes": scenes.sample_scenes,
    }
    for name, obj in same.items():
        assert getattr(legrad.loading, name) is obj, name
    for name in ("Explainer", "Explanation", "clean_prompts", "clean_targets", "MAX_TOKENS"):
        assert getattr(legrad.explainer, name) is getattr(explainer, name), name
    assert legrad.viz.atomic_writer is files.atomic_writer
    assert utils.visualize is legrad.viz.visualize and utils.overlay is legrad.viz.overlay


@pytest.mark.parametrize("text, url", [
    ("http://example.com/a.png", True), ("HTTPS://example.com/a.png", True), ("https://x", True),
    ("ftp://example.com/a.png", False), ("httpx://a", False), ("./http://a.png", False), ("a/http://b", False),
    ("images/cat.png", False), ("", False), (" http://a", False),
])
def test_is_url(text, url):
    from legrad.frontend.fetch import is_url

    assert is_url(text) is url


def test_is_url_is_the_only_url_test():
    """Paths and URLs are told apart in one place; other modules call ``is_url``."""
    files = [*_modules(), REPO / "app.py", REPO / "playground.py"]
    hits = [p.relative_to(REPO).as_posix() for p in files
            if "https?://" in p.read_text(encoding="utf-8")
            or '"http://", "https://"' in p.read_text(encoding="utf-8")]
    assert hits == ["legrad/frontend/fetch.py"]


def test_engine_never_imports_front_ends():
    bad = []
    for path in _modules():
        rel = path.relative_to(PKG).parts
        if rel[0] in FRONT or rel[0] == "__main__.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if _is_alias(tree):
            continue
        for name in _imported(path, tree):
            top = name.split(".")[0]
            if top in FRONT_LIBRARIES or any(name == f"legrad.{p}" or name.startswith(f"legrad.{p}.")
                                             for p in FRONT - {"toy"}):
                bad.append(f"{os.sep.join(rel)} imports {name}")
    assert not bad, bad


def test_front_end_modules_are_small_and_share_no_private_names():
    problems = []
    for sub in ("frontend", "viz"):
        for path in sorted((PKG / sub).glob("*.py")):
            text = path.read_text(encoding="utf-8")
            if text.count("\n") > 450:
                problems.append(f"{path.name}: {text.count(chr(10))} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ImportFrom):
                    private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
                    if private and node.module != "__future__":
                        problems.append(f"{sub}/{path.name} imports {private} from {node.module}")
    assert not problems, problems
