"""Every Python example of the README and of docs/*.md runs verbatim, as a new user would run it.

Each page's ```python blocks run top to bottom in one namespace (one reader, one session), in a fresh
child process whose working directory is a temporary folder outside the repository, with ``legrad``
importable the way an install makes it (the package alone: no ``utils.py``, ``app.py`` or test helpers
of the checkout), matplotlib's Agg backend, no display and every outgoing connection refused.

The one rule for not running a block: it needs a download (pretrained weights, a hub model, a URL).
Such a block carries, on the line right above its fence, a comment that says so::

    <!-- docs-test: skip (downloads ViT-B-16 weights) -->

and is reported as skipped with that reason (``pytest -rs``), one test per block (``README.md#2``).
A block that needs files (an ``images/`` folder...) makes them itself, visibly, as the reader would.
After a page's blocks, the checks of :data:`CLAIMS` run in the same namespace: what the blocks' comments
and the prose say (shapes, the demo model's layer index) is what they compute.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.frontend_utils import PYTHON, REPO, subprocess_env

PAGES = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
SKIP_MARK = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->")
FENCE = re.compile(r"^```python[ \t]*\n(?P<code>.*?)^```[ \t]*$", re.S | re.M)
PAGE_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    page: str
    number: int  # 1-based, among the page's python blocks
    line: int  # line of the opening fence
    code: str
    skip: str | None  # the reason of a docs-test skip comment right above the fence

    @property
    def label(self) -> str:
        return f"{self.page} block {self.number} (line {self.line})"


def python_blocks(page: str, text: str | None = None) -> list[Block]:
    """The ```python blocks of a page (its file, or ``text``), in order, with their skip reasons."""
    text = (REPO / page).read_text(encoding="utf-8") if text is None else text
    out = []
    for number, match in enumerate(FENCE.finditer(text), 1):
        before = text[: max(match.start() - 1, 0)].rsplit("\n", 1)[-1]  # the line right above the fence
        skip = SKIP_MARK.fullmatch(before.strip())
        out.append(Block(page, number, text.count("\n", 0, match.start()) + 1, match.group("code"),
                         skip["reason"].strip() if skip else None))
    return out


BLOCKS = [b for page in PAGES for b in python_blocks(page)]

# Checked after a page's blocks, in their namespace: the numbers their comments and the prose give.
CLAIMS = {
    "README.md": """
assert tuple(heatmaps.shape) == (1, 3, 64, 64), heatmaps.shape           # '[1, 3, 64, 64] in [0, 1]'
assert float(heatmaps.min()) == 0.0 and float(heatmaps.max()) == 1.0
assert tuple(image.shape) == (1, 3, 64, 64)
""",
    "docs/architecture.md": """
import legrad
assert "toy ViT" in legrad.supported_tower_names()                          # registered by the block
assert method_maps.shape == (1, 2, 64, 64) and float(method_maps.max()) == 1.0  # the added method's maps
""",
    "docs/demo_model.md": """
import legrad.toy
assert wrapper.layer_index == legrad.toy.LAYER_INDEX == 6                  # 'recommended layer_index, 6'
assert maps.shape == (1, len(scene.objects), 64, 64), maps.shape
""",
    "docs/differences.md": """
assert same < 1e-5, same                                                    # 'round-off (below 1e-5)'
assert ours.shape == (1, 2, 64, 64)
""",
    "docs/evaluation.md": """
assert maps.shape == masks.shape == (1, len(scene.phrases), 64, 64)
assert prompt_maps.shape == raw.shape == (2, 3, 64, 64) and float(prompt_maps.max()) == 1.0
assert float(raw.max()) < 1.0  # raw relevance is not min-max scaled
assert sens.shape == infid.shape == (2,) and bool((sens >= 0).all())
""",
    "docs/extract.md": """
assert (result.computed, result.skipped, result.failed) == (6, 0, 0), result
assert (again.computed, again.skipped) == (0, 6), again
assert out["maps"].dtype.name == "float16" and out["maps"].shape == (2, 8, 8)  # patch grid of the 64 px input
assert out["similarity"].dtype.name == "float32" and out["similarity"].shape == (2,)
""",
    "docs/usage.md": """
import legrad.toy
from legrad.frontend.scenes import sample_scenes
assert model.layer_index == legrad.toy.LAYER_INDEX == 6                    # '(demo model: 6)'
assert tuple(heatmaps.shape) == (1, 2, 448, 448), heatmaps.shape
phrases = {p for s in sample_scenes() if s.path.name == 'scene_0.png' for p in s.phrases}
assert set(prompts) <= phrases, (prompts, phrases)                          # prompts name objects in the scene
assert maps.equal(heatmaps) and scores.shape == (1, 2) and image_features.shape == (1, model.adapter.embed_dim)
""",
    "docs/visualization.md": """
import os
assert os.path.getsize('outputs/scene.png') > 0 and len(fig.axes) >= 3
""",
    "docs/vlm.md": """
assert tuple(maps.shape) == (1, 2, 32, 32) and float(maps.min()) == 0.0 and float(maps.max()) == 1.0
assert tuple(grid.shape) == (1, 2, 4, 4) and tuple(scores.shape) == (1, 2), (grid.shape, scores.shape)
assert bool((scores < 0).all()), scores                                    # log-probabilities
assert type(processor).__name__ == 'LlavaProcessor' and wrapper.adapter.depth == 3   # blocks feeding layer -2
""",
}

# The child: runs the blocks given in a JSON file, in one namespace, with every connection refused, and
# writes what happened to each block as it goes (a crash or a timeout still leaves the blocks before it).
_RUNNER = r"""
import json, socket, sys, traceback

def _refuse(*args, **kwargs):
    raise OSError('network access attempted by a documentation example')
socket.socket.connect = _refuse
socket.create_connection = _refuse

spec = json.load(open(sys.argv[1], encoding='utf-8'))
results = {}
namespace = {'__name__': '__main__'}
for key, label, filename, code in spec['run']:
    print(f'### {label}', flush=True)
    try:
        exec(compile(code, filename, 'exec'), namespace)
        results[key] = {'ok': True}
    except BaseException:
        results[key] = {'ok': False, 'error': traceback.format_exc()[-4000:]}
    with open(sys.argv[2], 'w', encoding='utf-8') as fh:
        json.dump(results, fh)
    if not results[key]['ok']:
        break
"""


def _child_env(site: Path) -> dict[str, str]:
    """The test environment with ``legrad`` importable as installed: the package alone, not the checkout."""
    env = subprocess_env()
    keep = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    env["PYTHONPATH"] = os.pathsep.join([str(site), *keep])
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    return env


def run_blocks(blocks: list[Block], claims: str | None, base: Path) -> dict:
    """Runs the blocks not skipped, then ``claims``, in one child process (cwd: ``base/reader``).

    Returns ``{"results": {key: {"ok", "error"}}, "order": [keys], "tail": the output's end}``, the keys
    being the block numbers and ``"claims"``.
    """
    assert not base.resolve().is_relative_to(REPO), f"the reader's folder {base} must be outside the repository"
    site, cwd = base / "site", base / "reader"
    site.mkdir()
    cwd.mkdir()
    (site / "legrad").symlink_to(REPO / "legrad", target_is_directory=True)
    # Blank lines before each block's code: a traceback's line numbers are the page's own.
    todo = [[str(b.number), b.label, b.page, "\n" * b.line + b.code] for b in blocks if b.skip is None]
    if claims is not None:
        todo.append(["claims", f"{blocks[0].page}: the checks of test_docs.CLAIMS", "CLAIMS", claims])
    (base / "spec.json").write_text(json.dumps({"run": todo}), encoding="utf-8")
    results = base / "results.json"
    try:
        proc = subprocess.run([PYTHON, "-c", _RUNNER, str(base / "spec.json"), str(results)], cwd=cwd,
                              env=_child_env(site), capture_output=True, text=True, timeout=PAGE_TIMEOUT_S)
        tail = (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        tail = f"timed out after {PAGE_TIMEOUT_S} s: {exc.stdout!s:.1000} {exc.stderr!s:.2000}"
    done = json.loads(results.read_text(encoding="utf-8")) if results.exists() else {}
    return {"results": done, "order": [item[0] for item in todo], "tail": tail}


@pytest.fixture(scope="module")
def run_page(tmp_path_factory):
    """``run_page(page)``: :func:`run_blocks` of the page with its claims, run once per page."""
    runs: dict[str, dict] = {}

    def run(page: str) -> dict:
        if page not in runs:
            runs[page] = run_blocks(python_blocks(page), CLAIMS.get(page), tmp_path_factory.mktemp("docs"))
        return runs[page]

    return run


def _outcome(run: dict, key: str, label: str) -> None:
    """Fails with the block's error, or with the block that stopped the page before it."""
    results = run["results"]
    if key in results:
        assert results[key]["ok"], f"{label} failed:\n{results[key]['error']}"
        return
    failed = [k for k in run["order"] if k in results and not results[k]["ok"]]
    reason = f"block {failed[0]} failed first" if failed else "the child process died"
    pytest.fail(f"{label} did not run: {reason}\n{run['tail']}")


@pytest.mark.subprocess
@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.page}#{b.number}" for b in BLOCKS])
def test_block_runs(block: Block, run_page):
    if block.skip:
        pytest.skip(f"{block.label}: {block.skip}")
    _outcome(run_page(block.page), str(block.number), block.label)


@pytest.mark.subprocess
@pytest.mark.parametrize("page", sorted(CLAIMS))
def test_page_claims(page, run_page):
    """What the page says its blocks compute (shapes, the demo model's layer index) is what they compute."""
    _outcome(run_page(page), "claims", f"{page}: the checks of CLAIMS")


# ---------------------------------------------------------------------------------------------- fast checks
def test_every_page_is_read_and_skips_are_for_downloads_only():
    assert {"README.md", "docs/usage.md", "docs/vlm.md", "docs/extract.md"} <= set(PAGES)
    skipped = [b for b in BLOCKS if b.skip]
    assert skipped and len(skipped) < len(BLOCKS)
    # Skipping is for blocks that download; every other block runs.
    assert not [b.label for b in skipped if "download" not in b.skip], "a skip reason must name the download"
    for page in PAGES:
        lines = [line for line in (REPO / page).read_text(encoding="utf-8").splitlines()
                 if re.match(r"<!--\s*docs-test", line)]  # (indented, as in docs/development.md: an example)
        marks = len(lines)
        assert all(SKIP_MARK.fullmatch(line.strip()) for line in lines), f"{page}: a malformed docs-test comment"
        assert marks == sum(b.skip is not None for b in BLOCKS if b.page == page), (
            f"{page}: a docs-test comment that is not on the line right above a ```python fence")
    # Each page whose blocks run has its claims checked, and each claim's page runs a block.
    assert set(CLAIMS) <= {b.page for b in BLOCKS if b.skip is None}


def _unbound_names(code: str, bound: set[str]) -> list[str]:
    """Names a block reads at run time (outside function bodies) that neither it, ``bound`` nor builtins bind."""
    import ast
    import builtins

    tree = ast.parse(code)
    deferred = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
    return sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
                   and id(n) not in deferred and n.id not in bound and not hasattr(builtins, n.id)})


def test_every_block_is_complete_python():
    """The blocks that are not run too (those that download) parse, and read no name that their page never
    defines before them: online, each runs as written."""
    problems = []
    for page in PAGES:
        bound: set[str] = set()
        for b in python_blocks(page):
            try:
                unbound = _unbound_names(b.code, bound)
            except SyntaxError as exc:
                problems.append(f"{b.label}: {exc}")
                continue
            if unbound:
                problems.append(f"{b.label} reads {unbound}, never defined on the page before it")
    assert not problems, problems


def test_the_readme_quick_start_comes_first():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    first = python_blocks("README.md")[0]
    assert first.skip is None and "compute_legrad" in first.code and "visualize(" in first.code
    assert readme.index("## Quick start") < readme.index(first.code)
    assert len(readme.encode("utf-8")) < 16 * 1024, "the README is a front door: keep it under 16 KB"


def test_every_image_of_the_pages_exists():
    """Figures live in the top-level assets/ folder; every image a page shows is there (after a move too)."""
    missing, shown = [], set()
    for page in PAGES:
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)", (REPO / page).read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target):
                continue
            path = ((REPO / page).parent / target).resolve()
            shown.add(path)
            if not path.is_file():
                missing.append(f"{page}: {target}")
    assert not missing, missing
    assert REPO / "assets" / "playground.png" in shown
    assert not [p.name for p in (REPO / "docs").iterdir() if p.suffix.lower() in {".png", ".jpg", ".svg", ".gif"}]


def test_the_sample_scenes_are_the_packaged_ones():
    """assets/scenes/ (the checkout's sample images) holds byte-identical copies of the demo scenes installed
    with the package, legrad/assets/scenes/ (scripts/make_sample_scenes.py writes both)."""
    packaged, samples = REPO / "legrad" / "assets" / "scenes", REPO / "assets" / "scenes"
    names = sorted(p.name for p in packaged.iterdir() if p.is_file())
    assert "scenes.json" in names and "scene_0.png" in names
    assert sorted(p.name for p in samples.iterdir() if p.is_file()) == names
    differ = [n for n in names if (packaged / n).read_bytes() != (samples / n).read_bytes()]
    assert not differ, f"{differ} differ: rerun python scripts/make_sample_scenes.py (it writes both folders)"


def test_the_block_parser():
    text = ("intro\n```python\na = 1\n```\n\n<!-- docs-test: skip (downloads w) -->\n```python\nb = 2\n```\n"
            "```bash\nls\n```\n<!-- docs-test: skip (downloads v) -->\n\n```python\nc = 3\n```\n")
    blocks = python_blocks("x.md", text)
    assert [(b.number, b.line, b.code, b.skip) for b in blocks] == [
        (1, 2, "a = 1\n", None), (2, 7, "b = 2\n", "downloads w"), (3, 15, "c = 3\n", None)]  # 3: not right above


@pytest.mark.subprocess
def test_a_broken_block_fails_with_its_page_number_and_error(tmp_path):
    text = "```python\nx = 1\n```\nthen\n```python\nimport os\nz = os.sep\n1 / x0\n```\n```python\ny = 2\n```\n"
    run = run_blocks(python_blocks("docs/x.md", text), "assert y == 2", tmp_path)
    _outcome(run, "1", "docs/x.md block 1 (line 1)")
    with pytest.raises(AssertionError, match=r"(?s)docs/x\.md block 2 \(line 5\) failed:.*File .docs/x\.md., line 8.*NameError: name 'x0'"):
        _outcome(run, "2", "docs/x.md block 2 (line 5)")
    with pytest.raises(pytest.fail.Exception, match="block 3 .*did not run: block 2 failed first"):
        _outcome(run, "3", "docs/x.md block 3 (line 10)")
    with pytest.raises(pytest.fail.Exception, match="did not run: block 2 failed first"):
        _outcome(run, "claims", "claims")
