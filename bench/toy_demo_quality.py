"""Does the bundled demo CLIP convince? Recognition, pointing and the bundled demo scenes.

On fresh held-out scenes, with the default ``LeWrapper(model)`` (the model's recommended
``layer_index``) and the model's own preprocess:

* recognition: single-object scenes whose object's phrase scores above every vocabulary phrase that
  differs from it in colour only or in shape only (the 11 hard negatives: 7 colours, 4 shapes);
* pointing game: every object of 1-3 object scenes is prompted with its phrase; a hit when the map's
  argmax pixel is inside the object's mask;
* shared-colour pointing: the same, restricted to objects whose colour another object of the scene has;
* demo scenes (``legrad/assets/scenes/``, drawn again with their masks by `legrad.toy.scenes.draw_sample_scenes`): for every
  object, the map's argmax is inside its mask and its phrase scores above every absent vocabulary phrase.

The held-out seed (default 2026) is used neither by training (``[seed, 1]`` / ``[seed, 2]`` streams of
``scripts/train_toy_clip.py``) nor for choosing the snapshot (validation: seed 5000).

Example:
    python bench/toy_demo_quality.py --n 1000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from legrad import LeWrapper
from legrad.frontend.scenes import SCENES_DIR
from legrad.toy import COLOURS, SHAPES, VOCABULARY, Scene, make_scenes, phrase_for
from legrad.toy.model import CHECKPOINT_PATH, load_checkpoint, make_preprocess, make_tokenizer
from legrad.toy.scenes import draw_sample_scenes


def hard_negatives(colour: str, shape: str) -> list[str]:
    """The vocabulary phrases differing from ``colour shape`` in exactly one word."""
    return [phrase_for(c, shape) for c in COLOURS if c != colour] + [phrase_for(colour, s) for s in SHAPES if s != shape]


def _vocab(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_text(tokenizer(list(VOCABULARY)), normalize=True)  # [V, E]


def recognition(model: torch.nn.Module, preprocess, tokenizer, n: int, seed: int) -> float:
    """Fraction of ``n`` single-object scenes whose phrase beats its 11 hard negatives."""
    scenes = make_scenes(n, seed=seed, size=model.visual.image_size[0], n_objects=1)
    vocab = _vocab(model, tokenizer)
    index = {p: i for i, p in enumerate(VOCABULARY)}
    with torch.no_grad():
        sims = model.encode_image(torch.stack([preprocess(s.image) for s in scenes]), normalize=True) @ vocab.T
    hits = 0
    for s, row in zip(scenes, sims):
        o = s.objects[0]
        negatives = [index[p] for p in hard_negatives(o.colour, o.shape)]
        hits += bool(row[index[o.phrase]] > row[negatives].max())
    return hits / n


def _argmax_in_mask(heatmap: torch.Tensor, mask: np.ndarray) -> bool:
    """Whether the argmax of an ``[h, w]`` map falls in a boolean mask of any (multiple) size."""
    h, w = heatmap.shape
    y, x = np.unravel_index(int(heatmap.argmax()), (h, w))
    sy, sx = mask.shape[0] / h, mask.shape[1] / w
    return bool(mask[int((y + 0.5) * sy), int((x + 0.5) * sx)])


def _shares_colour(scene: Scene, k: int) -> bool:
    return any(o.colour == scene.objects[k].colour for j, o in enumerate(scene.objects) if j != k)


def pointing(
    model: torch.nn.Module, preprocess, tokenizer, n: int, seed: int, layer_index: int | None = None, batch: int = 50
) -> dict[str, float]:
    """Pointing game over all objects of ``n`` scenes, and over the objects sharing their colour
    (``layer_index`` None: the model's default)."""
    wrapper = LeWrapper(model, layer_index=layer_index)
    vocab = _vocab(model, tokenizer)
    index = {p: i for i, p in enumerate(VOCABULARY)}
    scenes = make_scenes(n, seed=seed, size=model.visual.image_size[0])
    hits, shared = [], []
    for start in range(0, n, batch):
        part = scenes[start : start + batch]
        images = torch.stack([preprocess(s.image) for s in part])
        # 3 prompts per image: its phrases, the last one repeated (extras ignored).
        ids = torch.tensor([[index[p] for p in s.phrases] + [index[s.phrases[-1]]] * (3 - len(s.objects)) for s in part])
        maps = wrapper.compute_legrad(vocab[ids], image=images)
        for b, s in enumerate(part):
            for k, obj in enumerate(s.objects):
                hits.append(_argmax_in_mask(maps[b, k], obj.mask))
                shared.append(_shares_colour(s, k))
    h, sh = np.array(hits), np.array(shared)
    return {"pg": float(h.mean()), "pg_shared": float(h[sh].mean()), "objects": len(h), "shared": int(sh.sum())}


def demo_scenes(
    model: torch.nn.Module, preprocess, tokenizer, folder: Path = SCENES_DIR, layer_index: int | None = None
) -> list[dict]:
    """Per object of the bundled demo scenes: map right, ranking right, its similarity and rank.

    The scenes are drawn again (for their masks); each must equal its PNG in ``folder`` pixel for pixel.
    """
    from PIL import Image

    wrapper = LeWrapper(model, layer_index=layer_index)
    vocab = _vocab(model, tokenizer)
    index = {p: i for i, p in enumerate(VOCABULARY)}
    rows = []
    for i, scene in enumerate(draw_sample_scenes()):
        png = folder / f"scene_{i}.png"
        with Image.open(png) as im:
            if not np.array_equal(np.asarray(im.convert("RGB")), np.asarray(scene.image)):
                raise ValueError(f"{png} is not the scene legrad.toy.scenes.draw_sample_scenes draws")
            image = preprocess(im.convert("RGB")).unsqueeze(0)
        ids = [index[p] for p in scene.phrases]
        with torch.no_grad():
            sims = (model.encode_image(image, normalize=True) @ vocab.T)[0]
        maps = wrapper.compute_legrad(vocab[ids], image=image)[0]
        absent = torch.ones(len(VOCABULARY), dtype=torch.bool)
        absent[ids] = False
        for k, obj in enumerate(scene.objects):
            rows.append({
                "scene": i, "phrase": obj.phrase, "map_ok": _argmax_in_mask(maps[k], obj.mask),
                "rank_ok": bool(sims[ids[k]] > sims[absent].max()), "similarity": float(sims[ids[k]]),
                "rank": int((sims > sims[ids[k]]).sum()) + 1,
            })
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="fresh scenes per metric")
    p.add_argument("--seed", type=int, default=2026, help="seed of the held-out scenes")
    p.add_argument("--checkpoint", default=None, help="checkpoint to load instead of the bundled one")
    p.add_argument("--layer-index", type=int, default=None, help="LeGrad layer_index (default: the model's own)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, cfg, _ = load_checkpoint(CHECKPOINT_PATH if args.checkpoint is None else args.checkpoint)
    preprocess, tokenizer = make_preprocess(cfg), make_tokenizer(cfg)
    t0 = time.time()
    rec = recognition(model, preprocess, tokenizer, args.n, args.seed)
    pg = pointing(model, preprocess, tokenizer, args.n, args.seed + 1, args.layer_index)
    rows = demo_scenes(model, preprocess, tokenizer, layer_index=args.layer_index)
    layer_index = LeWrapper(model, layer_index=args.layer_index).layer_index
    print(f"checkpoint {args.checkpoint or CHECKPOINT_PATH}, layer_index {layer_index}, "
          f"held-out seeds {args.seed} (single-object) / {args.seed + 1} (1-3 objects), {time.time() - t0:.0f}s")
    print(f"recognition {rec:.3f} ({args.n} single-object scenes)")
    print(f"pointing game {pg['pg']:.3f} ({pg['objects']} objects of {args.n} scenes)")
    print(f"pointing, shared colour {pg['pg_shared']:.3f} ({pg['shared']} objects)")
    ok = sum(r["map_ok"] and r["rank_ok"] for r in rows)
    print(f"demo scenes: {ok}/{len(rows)} objects right (map and ranking)")
    for r in rows:
        print(f"  scene_{r['scene']} {r['phrase']:<18} map {'ok ' if r['map_ok'] else 'BAD'} "
              f"rank {r['rank']:2d} {'ok ' if r['rank_ok'] else 'BAD'} similarity {r['similarity']:.2f}")


if __name__ == "__main__":
    main()
