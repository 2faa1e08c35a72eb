"""Localization check of LeGrad on the bundled demo CLIP, against trivial baselines.

On N fresh held-out scenes, every object's phrase is used as a prompt; a heatmap scores
* pointing game: the heatmap's argmax pixel lies inside the object's mask;
* IoU: pixels with heatmap >= 0.5 vs the object's mask (mIoU: mean over objects).

* patch pointing game: the patch holding the argmax pixel overlaps the object (the pixel-level
  game also fails when the map peaks on a patch only partly covered by the object).

Methods: LeGrad at the given ``layer_index`` and at -2 (and every index with ``--sweep``), a centred
Gaussian, and the last block's CLS attention averaged over heads (both text-independent), LeGrad on
the same architecture with random weights; an "oracle" row thresholds the object mask pooled to
the patch grid, the best a patch-level map gets.

Example:
    python bench/toy_localization.py --n 500 --seed 1000
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from legrad import LeWrapper
from legrad.toy import LAYER_INDEX, VOCABULARY, Scene, make_scenes
from legrad.toy.model import (
    CHECKPOINT_PATH,
    ToyConfig,
    build_model,
    load_checkpoint,
    make_preprocess,
    make_tokenizer,
)


@dataclass
class Tally:
    """Per-object results of one method."""

    hits: list[bool] = field(default_factory=list)
    patch_hits: list[bool] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)
    shared: list[bool] = field(default_factory=list)

    def add(self, heatmap: np.ndarray, mask: np.ndarray, shared_colour: bool, patch: int) -> None:
        """Score one ``(H, W)`` heatmap in [0, 1] against a boolean mask."""
        y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
        self.hits.append(bool(mask[y, x]))
        py, px = (y // patch) * patch, (x // patch) * patch
        self.patch_hits.append(bool(mask[py : py + patch, px : px + patch].any()))
        pred = heatmap >= 0.5
        self.ious.append(float((pred & mask).sum() / max(1, (pred | mask).sum())))
        self.shared.append(shared_colour)

    def summary(self) -> dict[str, float]:
        """Pointing game and mIoU, overall and on objects sharing their colour with another one."""
        hits, ious, shared = np.array(self.hits), np.array(self.ious), np.array(self.shared)
        out = {"pg": hits.mean(), "miou": ious.mean(), "pg_patch": np.mean(self.patch_hits)}
        out["pg_shared"] = hits[shared].mean() if shared.any() else float("nan")
        out["miou_shared"] = ious[shared].mean() if shared.any() else float("nan")
        return out


def cls_attention(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Last block's CLS-to-patch attention averaged over heads, ``[B, gh, gw]``."""
    visual = model.visual
    blocks = visual.transformer.resblocks
    with torch.no_grad():
        x = visual._embeds(images)
        for blk in blocks[:-1]:
            x = blk(x)
        y = blocks[-1].ln_1(x)
        _, w = blocks[-1].attn(y, y, y, need_weights=True, average_attn_weights=True)
    cls = w[:, 0, 1:]
    g = int(math.isqrt(cls.shape[-1]))
    return cls.reshape(-1, g, g)


def to_pixels(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Upsample ``[B, gh, gw]`` maps bilinearly to ``size`` and min-max normalise each."""
    maps = F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    lo = maps.flatten(1).min(1).values[:, None, None]
    hi = maps.flatten(1).max(1).values[:, None, None]
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


def gaussian_map(size: int, sigma_frac: float = 0.25) -> np.ndarray:
    """A centred isotropic Gaussian with max 1 (sigma = ``sigma_frac`` * size)."""
    c = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size]
    return np.exp(-((yy - c) ** 2 + (xx - c) ** 2) / (2 * (sigma_frac * size) ** 2))


def oracle_map(mask: np.ndarray, patch: int) -> np.ndarray:
    """The mask's per-patch coverage, upsampled like a heatmap (best case for a patch-level map)."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    cov = F.avg_pool2d(t, patch)
    return to_pixels(cov[:, 0], mask.shape[0])[0].numpy()


def shares_colour(scene: Scene, k: int) -> bool:
    """Whether object ``k`` has the same colour as another object of the scene."""
    return any(o.colour == scene.objects[k].colour for j, o in enumerate(scene.objects) if j != k)


def run(
    model: torch.nn.Module,
    cfg: ToyConfig,
    n: int,
    seed: int,
    layer_indices: list[int],
    batch_size: int = 50,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, dict[str, float]], list[Scene]]:
    """Score every method on ``n`` fresh scenes for the demo-architecture ``model`` built from ``cfg``.

    Returns:
        ``({method: summary}, scenes)``.
    """
    preprocess, tokenizer = make_preprocess(cfg), make_tokenizer(cfg)
    torch.manual_seed(0)
    random_model = build_model(cfg).eval()
    size, patch = cfg.image_size, cfg.patch_size
    wrapper, random_wrapper = LeWrapper(model), LeWrapper(random_model)
    scenes = make_scenes(n, seed=seed, size=size)
    with torch.no_grad():
        vocab = model.encode_text(tokenizer(list(VOCABULARY)), normalize=True)
        random_vocab = random_model.encode_text(tokenizer(list(VOCABULARY)), normalize=True)
    index = {p: i for i, p in enumerate(VOCABULARY)}

    tallies: dict[str, Tally] = {f"LeGrad layer_index={li}": Tally() for li in layer_indices}
    random_name = f"LeGrad layer_index={LAYER_INDEX}, random-init weights"
    for name in (random_name, "centred Gaussian", "CLS attention (last block)", "oracle (patch-grid mask)"):
        tallies[name] = Tally()
    gauss = gaussian_map(size)
    t0 = time.time()
    for start in range(0, n, batch_size):
        batch = scenes[start : start + batch_size]
        images = torch.stack([preprocess(s.image) for s in batch])
        # Every image gets 3 prompts (its phrases, the last one repeated); extras are ignored.
        ids = torch.tensor(
            [[index[p] for p in s.phrases] + [index[s.phrases[-1]]] * (3 - len(s.objects)) for s in batch]
        )
        attn = to_pixels(cls_attention(model, images), size).numpy()
        random_maps = random_wrapper.compute_legrad(random_vocab[ids], image=images, layer_index=LAYER_INDEX).numpy()
        per_layer = {
            li: wrapper.compute_legrad(vocab[ids], image=images, layer_index=li).numpy() for li in layer_indices
        }
        for b, s in enumerate(batch):
            for k, obj in enumerate(s.objects):
                shared = shares_colour(s, k)
                for li in layer_indices:
                    tallies[f"LeGrad layer_index={li}"].add(per_layer[li][b, k], obj.mask, shared, patch)
                tallies[random_name].add(random_maps[b, k], obj.mask, shared, patch)
                tallies["centred Gaussian"].add(gauss, obj.mask, shared, patch)
                tallies["CLS attention (last block)"].add(attn[b], obj.mask, shared, patch)
                tallies["oracle (patch-grid mask)"].add(oracle_map(obj.mask, patch), obj.mask, shared, patch)
        log(f"  {start + len(batch)}/{n} scenes ({time.time() - t0:.0f}s)")
    return {name: t.summary() for name, t in tallies.items()}, scenes


def format_table(results: dict[str, dict[str, float]], n_objects: int, n_shared: int) -> str:
    """A markdown table of the results."""
    lines = [
        "| method | pointing game | mIoU | PG, shared colour | mIoU, shared colour | patch PG |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['pg']:.3f} | {r['miou']:.3f} | {r['pg_shared']:.3f} | {r['miou_shared']:.3f} "
                     f"| {r['pg_patch']:.3f} |")
    lines.append(f"\n{n_objects} objects, {n_shared} of them share their colour with another object of the scene.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500, help="number of fresh scenes")
    p.add_argument("--seed", type=int, default=1000, help="seed of the held-out scenes")
    p.add_argument("--layer-index", type=int, default=LAYER_INDEX, help="LeGrad layer_index to report")
    p.add_argument("--sweep", action="store_true", help="also report every layer index of the tower")
    p.add_argument("--checkpoint", default=None, help="checkpoint to load instead of the bundled one")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, cfg, _ = load_checkpoint(CHECKPOINT_PATH if args.checkpoint is None else args.checkpoint)
    depth = cfg.vision_layers
    indices = list(range(depth)) if args.sweep else [args.layer_index]
    wanted = [i % depth for i in [args.layer_index, -2]]
    indices = sorted(set(indices) | set(wanted))
    t0 = time.time()
    results, scenes = run(model, cfg, args.n, args.seed, indices)
    # Name the rows as given on the command line / as the recommended index.
    named = {}
    for name, r in results.items():
        match = re.fullmatch(r"LeGrad layer_index=(-?\d+)", name)
        if match:
            li = int(match.group(1))
            tags = []
            if li == args.layer_index % depth:
                tags.append("LAYER_INDEX" if args.layer_index == LAYER_INDEX else "requested")
            if li == depth - 2:
                tags.append("-2")
            name = name + (f" ({', '.join(tags)})" if tags else "")
        named[name] = r
    n_objects = sum(len(s.objects) for s in scenes)
    n_shared = sum(shares_colour(s, k) for s in scenes for k in range(len(s.objects)))
    print(f"\n{args.n} scenes, seed {args.seed}, {depth} blocks, {time.time() - t0:.0f}s\n")
    print(format_table(named, n_objects, n_shared))


if __name__ == "__main__":
    main()
