"""Write the demo scenes shipped in the package, ``legrad/assets/scenes/`` (PNGs + ``scenes.json`` with their phrases and captions),
and their byte-identical copies among the checkout's sample images, ``assets/scenes/`` (``--mirror``; tests/test_docs.py
checks that the two agree).

The scenes are drawn deterministically from ``--seed`` by `legrad.toy.scenes.draw_sample_scenes` (no
selection by model quality): the first scenes with 2-3 objects, plus the first one where two objects
share a colour (the hard case).

Example:
    python scripts/make_sample_scenes.py --out legrad/assets/scenes --n 6 --size 192
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from legrad.toy.scenes import draw_sample_scenes

PACKAGED = Path("legrad/assets/scenes")  # installed with the package: the demo scenes of every front end
SAMPLES = Path("assets/scenes")  # the checkout's sample images beside the figures: the same files


def main(argv: list[str] | None = None) -> None:
    """Draw and save the sample scenes."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=PACKAGED)
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--size", type=int, default=192, help="side in pixels (the model resizes to 64)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--mirror", type=Path, default=None,
                   help=f"also copy the written files into this folder (default: {SAMPLES} when --out is {PACKAGED}, "
                        "the checkout's sample images; else none)")
    args = p.parse_args(argv)
    mirror = args.mirror if args.mirror is not None else SAMPLES if args.out == PACKAGED else None

    chosen = draw_sample_scenes(args.n, args.seed, args.size)

    args.out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, scene in enumerate(chosen):
        name = f"scene_{i}.png"
        scene.image.save(args.out / name)
        entries.append({
            "file": name,
            "caption": scene.caption,
            "phrases": scene.phrases,
            "boxes_xyxy": [
                [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
                for ys, xs in (np.nonzero(o.mask) for o in scene.objects)
            ],
        })
        print(name, scene.caption)
    meta = {
        "generator": f"legrad.toy.make_scene, seed {args.seed}, size {args.size}",
        "command": f"python scripts/make_sample_scenes.py --out {args.out} --n {args.n} --size {args.size} --seed {args.seed}",
        "scenes": entries,
    }
    (args.out / "scenes.json").write_text(json.dumps(meta, indent=2) + "\n")
    if mirror is not None:
        mirror.mkdir(parents=True, exist_ok=True)
        for name in [e["file"] for e in entries] + ["scenes.json"]:
            shutil.copyfile(args.out / name, mirror / name)


if __name__ == "__main__":
    main()
