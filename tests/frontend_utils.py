"""Helpers shared by the front-end tests (CLI, playground, app): the demo model and scene images."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bundled_checkpoint() -> Path:
    from legrad.toy import CHECKPOINT_PATH

    return Path(CHECKPOINT_PATH)


def toy_pretrained_args(tmp_root: Path) -> list[str]:
    """``[]`` when the bundled demo checkpoint exists, else ``['--pretrained', tiny]`` with a tiny
    random-init demo-format checkpoint (so the front ends run the same code path while the trained
    checkpoint is not there)."""
    if bundled_checkpoint().is_file():
        return []
    return ["--pretrained", str(tiny_toy_checkpoint(tmp_root))]


def tiny_toy_checkpoint(tmp_root: Path) -> Path:
    import torch

    from legrad.toy.model import ToyConfig, build_model, known_token_ids, make_tokenizer, save_checkpoint

    path = tmp_root / "tiny_toy.pt"
    if not path.exists():
        torch.manual_seed(0)
        cfg = ToyConfig(embed_dim=32, vision_width=32, vision_layers=2, vision_head_width=16, text_width=32,
                        text_heads=2, text_layers=1)
        save_checkpoint(build_model(cfg), cfg, path, known_token_ids(make_tokenizer(cfg)))
    return path


def write_scenes(folder: Path, n: int, seed: int = 0) -> list[tuple[Path, list[str]]]:
    """Writes ``n`` demo scenes as PNGs; returns ``(path, phrases)`` per scene."""
    from legrad.toy.scenes import make_scenes

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, scene in enumerate(make_scenes(n, seed=seed)):
        path = folder / f"scene{i}.png"
        scene.image.save(path)
        out.append((path, [o.phrase for o in scene.objects]))
    return out


def bundled_scenes() -> list[tuple[Path, list[str]]]:
    """The demo scenes shipped in ``assets/`` as ``(path, phrases)``."""
    from legrad.loading import sample_scenes

    scenes = sample_scenes(REPO / "assets")
    assert scenes, "assets/scenes.json and its images are missing"
    return [(s.path, list(s.phrases)) for s in scenes]


def copy_scenes(folder: Path, scenes: list[tuple[Path, list[str]]]) -> list[tuple[Path, list[str]]]:
    """Copies scene images into ``folder``; returns the copies with their phrases."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    return [(Path(shutil.copy(path, folder / path.name)), phrases) for path, phrases in scenes]


def subprocess_env() -> dict[str, str]:
    """Environment for front-end subprocesses: one torch thread, headless matplotlib, repo on the path."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1",
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


PYTHON = sys.executable
