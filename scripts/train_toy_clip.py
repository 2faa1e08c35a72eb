"""Train the bundled demo CLIP on synthetic scenes (CPU, deterministic given --seed).

Each step draws a fresh batch of scenes (1-3 objects each) and encodes every phrase of the
vocabulary. The loss is a multi-positive CLIP loss over (image, phrase) pairs: each object phrase
of an image must beat, for that image, every phrase not in it (image -> text), and beat, for that
phrase, every image of the batch not containing it (text -> image). Since all phrases are scored
every step, the same-colour / same-shape hard negatives are always present. Options add scenes
redrawn until two objects share a colour or a shape (``--hard-prob``) and a dense loss on the patch
tokens of chosen blocks against the object masks (``--dense-layers``, ``--dense-weight``).

The bundled checkpoint is made in two stages (a from-scratch run, then a fine-tune with ``--init``);
the exact commands and times are in docs/demo_model.md.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from legrad.toy.model import ToyConfig, build_model, known_token_ids, make_tokenizer, save_checkpoint
from legrad.toy.scenes import VOCABULARY, make_scene
from legrad.toy.training import (
    block_with_probs,
    dense_loss,
    dense_targets,
    encode_image_all,
    legrad_patch_map,
    map_loss,
    multi_positive_loss,
    pick_map_objects,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps (same schedule as --steps; reproduces a snapshot)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--hires-prob", type=float, default=0.25,
                   help="fraction of scenes rendered at 1.5-3x and downsampled like the preprocess does")
    p.add_argument("--mean-weight", type=float, default=0.0,
                   help="weight of the same loss on the mean of all final tokens (ln_post + proj)")
    p.add_argument("--deep-layers", type=str, default="",
                   help="comma-separated blocks whose mean token (ln_post + proj) also gets the loss")
    p.add_argument("--deep-weight", type=float, default=0.0, help="loss weight per --deep-layers block")
    p.add_argument("--patch-dropout", type=float, default=0.0, help="training-time patch dropout")
    p.add_argument("--init", type=Path, default=None, help="start from this checkpoint (experiments)")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-scenes", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("legrad/assets/toy_clip.pt"))
    p.add_argument("--snapshots", type=Path, default=None, help="also keep a checkpoint per eval here")
    p.add_argument("--state", type=Path, default=None,
                   help="write the full training state (weights, optimizer, step, random streams) here at each eval")
    p.add_argument("--resume", type=Path, default=None,
                   help="continue a run from its --state file (same options): bit-identical to an uninterrupted run")
    p.add_argument("--vision-width", type=int, default=None)
    p.add_argument("--vision-layers", type=int, default=None)
    p.add_argument("--vision-head-width", type=int, default=None, help="width per image attention head")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--pos-embed", choices=["learnable", "sin_cos_2d"], default=None)
    p.add_argument("--pool-type", choices=["tok", "avg"], default=None,
                   help="image pooling: CLS token or mean of the patch tokens")
    p.add_argument("--curriculum-steps", type=int, default=0,
                   help="first steps draw larger objects (--curriculum-radius), which makes shapes easier")
    p.add_argument("--curriculum-radius", type=str, default="0.16,0.30")
    p.add_argument("--hard-prob", type=float, default=0.0,
                   help="fraction of scenes redrawn until two objects share a colour or a shape (hard negatives)")
    p.add_argument("--dense-layers", type=str, default="",
                   help="comma-separated blocks whose patch tokens (ln_post + proj) get the dense loss")
    p.add_argument("--dense-weight", type=float, default=0.0,
                   help="weight of the dense loss: each patch mostly covered by an object must score its "
                        "object's phrase above every other phrase and a learned background embedding")
    p.add_argument("--map-layers", type=str, default="",
                   help="blocks whose LeGrad maps are trained to point: per scene one object's phrase, "
                        "its map (summed over these blocks, as LeGrad sums them) must peak on the object")
    p.add_argument("--map-weight", type=float, default=0.0, help="weight of the map loss")
    p.add_argument("--map-temp", type=float, default=0.1,
                   help="temperature of the softmax over patches of the max-normalised map")
    p.add_argument("--map-shared-prob", type=float, default=0.5,
                   help="chance that the map loss's object is one sharing its colour with another (if any)")
    return p.parse_args(argv)


def _is_hard(phrases: list[str]) -> bool:
    """Whether two objects share a colour or a shape (the scene then holds its own hard negatives)."""
    words = [p.split()[1:] for p in phrases]
    colours, shapes = [w[0] for w in words], [w[1] for w in words]
    return len(set(colours)) < len(colours) or len(set(shapes)) < len(shapes)


def render(
    scene_rng: np.random.Generator,
    size: int,
    hires_prob: float,
    radius_range: tuple[float, float] | None = None,
    hard_prob: float = 0.0,
    grid: int = 0,
) -> tuple[Image.Image, list[str], torch.Tensor | None]:
    """Draw one training scene at ``size`` px (sometimes rendered larger and downsampled).

    With probability ``hard_prob`` scenes are redrawn (at most 50 times) until two objects share a
    colour or a shape. With ``grid`` > 0 also returns each object's coverage of the ``grid x grid``
    patches, ``[objects, grid, grid]`` in [0, 1].
    """
    render_size = size
    if scene_rng.random() < hires_prob:
        render_size = int(size * scene_rng.uniform(1.5, 3.0))
    want_hard = hard_prob > 0 and scene_rng.random() < hard_prob
    for _ in range(50):
        scene = make_scene(scene_rng, size=render_size, radius_range=radius_range)
        if not want_hard or _is_hard(scene.phrases):
            break
    img = scene.image
    if render_size != size:
        img = img.resize((size, size), Image.BICUBIC)
    cover = None
    if grid > 0:
        masks = torch.from_numpy(np.stack([o.mask for o in scene.objects]).astype(np.float32))
        cover = F.adaptive_avg_pool2d(masks[None], (grid, grid))[0]
    return img, scene.phrases, cover


def to_tensor(images: list[Image.Image], cfg: ToyConfig) -> torch.Tensor:
    """Stack PIL images into a normalised batch (same maths as the inference preprocess)."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def evaluate(model: torch.nn.Module, cfg: ToyConfig, vocab_tokens: torch.Tensor, seed: int, n: int) -> dict[str, float]:
    """Held-out zero-shot metrics over VOCABULARY on fresh scenes.

    Returns:
        ``zs_single``: top-1 accuracy on single-object scenes; ``zs_object``: fraction of objects of
        1-3 object scenes whose phrase outranks every absent phrase; ``zs_scene``: fraction of
        scenes whose top-k phrases are exactly their k objects.
    """
    model.eval()
    rng = np.random.default_rng([seed, 2])
    txt = F.normalize(model.encode_text(vocab_tokens), dim=-1)
    single = [make_scene(rng, size=cfg.image_size, n_objects=1) for _ in range(n // 2)]
    multi = [make_scene(rng, size=cfg.image_size) for _ in range(n // 2)]
    out: dict[str, float] = {}
    sims = F.normalize(model.encode_image(to_tensor([s.image for s in single], cfg)), dim=-1) @ txt.T
    truth = torch.tensor([VOCABULARY.index(s.phrases[0]) for s in single])
    out["zs_single"] = (sims.argmax(1) == truth).float().mean().item()
    sims = F.normalize(model.encode_image(to_tensor([s.image for s in multi], cfg)), dim=-1) @ txt.T
    hits, scene_hits = 0, 0
    n_obj = 0
    for s, row in zip(multi, sims):
        idx = [VOCABULARY.index(p) for p in s.phrases]
        mask = torch.zeros(len(VOCABULARY), dtype=torch.bool)
        mask[idx] = True
        best_absent = row[~mask].max()
        ok = row[idx] > best_absent
        hits += int(ok.sum())
        n_obj += len(idx)
        scene_hits += int(ok.all())
    out["zs_object"] = hits / n_obj
    out["zs_scene"] = scene_hits / len(multi)
    model.train()
    return out


def save_state(path: Path, step: int, model: torch.nn.Module, bg_embed: torch.Tensor, opt: torch.optim.Optimizer,
               scene_rng: np.random.Generator) -> None:
    """Everything a run needs to continue exactly: weights (training form), optimizer, next step, random streams.

    Written to a temporary file first, so an interrupted write never replaces a good state.
    """
    state = {"step": step, "model": model.state_dict(), "bg_embed": bg_embed.detach().clone(),
             "opt": opt.state_dict(), "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
             "scene_rng": scene_rng.bit_generator.state}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path, model: torch.nn.Module, bg_embed: torch.Tensor, opt: torch.optim.Optimizer,
               scene_rng: np.random.Generator) -> int:
    """Restores :func:`save_state`'s file into a freshly built run; returns the step to continue from."""
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: RNG states are not tensors
    model.load_state_dict(state["model"])
    with torch.no_grad():
        bg_embed.copy_(state["bg_embed"])
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    scene_rng.bit_generator.state = state["scene_rng"]
    return int(state["step"])


def main(argv: list[str] | None = None) -> None:
    """Train and save the demo checkpoint."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    overrides = {
        k: v
        for k, v in dict(
            vision_width=args.vision_width,
            vision_layers=args.vision_layers,
            vision_head_width=args.vision_head_width,
            image_size=args.image_size,
            patch_size=args.patch_size,
            pos_embed_type=args.pos_embed,
            pool_type=args.pool_type,
        ).items()
        if v is not None
    }
    cfg = ToyConfig(**overrides)
    tokenizer = make_tokenizer(cfg)
    token_ids = known_token_ids(tokenizer)
    # Train on a compact embedding table: token id -> row index (order-preserving, so the
    # end-of-text token keeps the largest index and open_clip's argmax pooling still finds it).
    remap = torch.zeros(49408, dtype=torch.long)
    remap[torch.tensor(token_ids)] = torch.arange(len(token_ids))
    vocab_tokens = remap[tokenizer(list(VOCABULARY))]

    model = build_model(cfg, vocab_size=len(token_ids))
    if args.init is not None:
        from legrad.toy.model import load_checkpoint

        # As stored (training normalisation): a rebuilt sin-cos table would drop a folded offset.
        init, init_cfg, _ = load_checkpoint(args.init, fold=False)
        # The pooling has no weights of its own, and a fixed sine-cosine position table is rebuilt for
        # any grid, so those may differ from the checkpoint's; nothing else may.
        allowed = {"pool_type"}
        if cfg.pos_embed_type == init_cfg.pos_embed_type == "sin_cos_2d":
            allowed.add("image_size")
        differing = {f.name for f in fields(cfg) if getattr(cfg, f.name) != getattr(init_cfg, f.name)}
        if differing - allowed:
            raise SystemExit(f"--init checkpoint has config {init_cfg}, expected {cfg}")
        state = init.state_dict()
        state["token_embedding.weight"] = state["token_embedding.weight"][torch.tensor(token_ids)]
        if init_cfg.image_size != cfg.image_size:  # the sin-cos table of the new grid
            state["visual.positional_embedding"] = model.visual.positional_embedding.detach().clone()
        model.load_state_dict(state)
    if args.patch_dropout > 0:
        from open_clip.transformer import PatchDropout

        model.visual.patch_dropout = PatchDropout(args.patch_dropout)  # identity in eval mode
    curriculum_radius = tuple(float(v) for v in args.curriculum_radius.split(","))
    deep_layers = tuple(int(i) for i in args.deep_layers.split(",") if i.strip())
    dense_layers = tuple(int(i) % cfg.vision_layers for i in args.dense_layers.split(",") if i.strip())
    map_layers = tuple(int(i) % cfg.vision_layers for i in args.map_layers.split(",") if i.strip())
    if not args.map_weight > 0:
        map_layers = ()
    grid = cfg.image_size // cfg.patch_size if (dense_layers and args.dense_weight > 0) or map_layers else 0
    # Training-only: the background class of the dense loss (not part of the saved model).
    bg_embed = torch.nn.Parameter(torch.randn(cfg.embed_dim) * 0.02)
    if map_layers:  # the map loss re-implements the block: it must be the block
        with torch.no_grad():
            t = model.visual._embeds(torch.randn(2, 3, cfg.image_size, cfg.image_size))
            blk = model.visual.transformer.resblocks[0]
            if not torch.allclose(block_with_probs(blk, t)[0], blk(t), atol=1e-5):
                raise SystemExit("block_with_probs differs from the model's own block forward")
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"config {cfg}\nparams {n_params / 1e6:.2f}M, kept token rows {len(token_ids)}", flush=True)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": [*no_decay, bg_embed], "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t))

    scene_rng = np.random.default_rng([args.seed, 1])
    first = 0
    if args.resume is not None:
        first = load_state(args.resume, model, bg_embed, opt, scene_rng)
        print(f"resumed {args.resume} at step {first}", flush=True)
    vocab_index = {p: i for i, p in enumerate(VOCABULARY)}
    meta_base = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "seed": args.seed,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "stop_after": args.stop_after,
        "mean_weight": args.mean_weight,
        "deep_layers": list(deep_layers),
        "deep_weight": args.deep_weight,
        "patch_dropout": args.patch_dropout,
        "curriculum_steps": args.curriculum_steps,
        "curriculum_radius": args.curriculum_radius,
        "init": None if args.init is None else str(args.init),
        "hard_prob": args.hard_prob,
        "dense_layers": list(dense_layers),
        "dense_weight": args.dense_weight,
        "map_layers": list(map_layers),
        "map_weight": args.map_weight,
        "map_temp": args.map_temp,
        "map_shared_prob": args.map_shared_prob,
    }
    t0 = time.time()
    run_loss = None
    n_run = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    for step in range(first, n_run):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        images, pos = [], torch.zeros(args.batch_size, len(VOCABULARY), dtype=torch.bool)
        covers, pos_ids = [], []
        for b in range(args.batch_size):
            img, phrases, cover = render(scene_rng, cfg.image_size, args.hires_prob,
                                         curriculum_radius if step < args.curriculum_steps else None,
                                         args.hard_prob, grid)
            images.append(img)
            pos_ids.append([vocab_index[p] for p in phrases])
            pos[b, pos_ids[-1]] = True
            covers.append(cover)
        x = to_tensor(images, cfg)
        traced: list[tuple[torch.Tensor, torch.Tensor]] = []
        cls_f, mean_f, deep_f, dense_f = encode_image_all(model, x, deep_layers,
                                                          dense_layers if args.dense_weight > 0 else (),
                                                          map_layers, traced)
        txt_f = F.normalize(model.encode_text(vocab_tokens), dim=-1)
        scale = model.logit_scale.exp()
        l_i2t, l_t2i = multi_positive_loss(scale * F.normalize(cls_f, dim=-1) @ txt_f.T, pos)
        loss = 0.5 * (l_i2t + l_t2i)
        if args.mean_weight > 0:
            m_i2t, m_t2i = multi_positive_loss(scale * F.normalize(mean_f, dim=-1) @ txt_f.T, pos)
            loss = loss + args.mean_weight * 0.5 * (m_i2t + m_t2i)
        for f in deep_f:
            d_i2t, d_t2i = multi_positive_loss(scale * F.normalize(f, dim=-1) @ txt_f.T, pos)
            loss = loss + args.deep_weight * 0.5 * (d_i2t + d_t2i)
        if dense_f:
            target = dense_targets(covers, pos_ids, len(VOCABULARY))
            l_dense = sum(dense_loss(f, txt_f, bg_embed, scale, target) for f in dense_f) / len(dense_f)
            loss = loss + args.dense_weight * l_dense
        l_map = None
        if traced:
            # Its own stream per step, so that a resumed run picks the same objects.
            picks = pick_map_objects(pos_ids, np.random.default_rng([args.seed, 3, step]), args.map_shared_prob)
            sel = torch.tensor([ids[j] for ids, j in zip(pos_ids, picks)])
            cover = torch.stack([c[j].flatten() for c, j in zip(covers, picks)])
            l_map = map_loss(legrad_patch_map(model.visual, traced, txt_f[sel]), cover, args.map_temp)
            loss = loss + args.map_weight * l_map
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        run_loss = loss.item() if run_loss is None else 0.95 * run_loss + 0.05 * loss.item()
        if step % 20 == 0:
            print(
                f"step {step:5d} loss {run_loss:.4f} (i2t {l_i2t.item():.3f} t2i {l_t2i.item():.3f}"
                + ("" if l_map is None else f" map {l_map.item():.3f}") + ") "
                f"scale {model.logit_scale.exp().item():.1f} lr {lr_at(step):.2e} {time.time() - t0:.0f}s",
                flush=True,
            )
        last = step == n_run - 1
        if (step + 1) % args.eval_every == 0 or last:
            metrics = evaluate(model, cfg, vocab_tokens, args.seed, args.eval_scenes)
            elapsed = time.time() - t0
            print(f"eval step {step + 1}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                  + f" ({elapsed:.0f}s)", flush=True)
            meta = {**meta_base, "trained_steps": step + 1, "train_seconds": round(elapsed), **metrics}
            save_checkpoint(model, cfg, args.out, token_ids, meta=meta)
            if args.snapshots is not None:
                save_checkpoint(model, cfg, args.snapshots / f"step{step + 1:05d}.pt", token_ids, meta=meta)
            if args.state is not None:
                save_state(args.state, step + 1, model, bg_embed, opt, scene_rng)
    print(f"saved {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB) after {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
