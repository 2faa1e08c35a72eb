"""legrad vs torchcam 0.5's ``LeGrad`` on a torchvision ViT classifier, as a function of the number of classes.

Builds a random-init torchvision ``vit_b_16`` (eval mode, fixed seed; its zero-initialised head gets small
random weights, as in tests/test_classifiers.py, so that the maps are not flat) and one fixed random image
batch, then for each class count P times, in the same process and in interleaved rounds:

- *forward*: one no-grad ``model(image)`` (the unit of the ratios);
- *legrad*: ``LeWrapper(model, layer_index=-L).compute_legrad(image=image, target=classes, output_size="grid")``:
  one forward, one batched backward for all P classes;
- *torchcam*: torchcam's ``LeGrad`` on a deep copy of the model (it hooks the model) with the last L
  blocks, used as documented and as tests/test_classifiers.py does: per class, one hooked forward with
  gradients and one ``extractor(class_idx=c, scores=scores)`` call (it takes one class per call);
- *torchcam 1-fwd*: the cheapest torchcam use: one hooked forward, then the P extractor calls with
  ``retain_graph=True`` (all but the last).

Both compute the same maps: torchcam averages the per-layer maps, legrad sums them, which min-max
normalisation makes equal; both return ``[B, P, h, w]`` patch-grid maps normalised to [0, 1] (legrad's
default upsampling to the input size is left out of the timing, as torchcam returns the grid). Before
timing, the script checks once that all three give the same maps for the largest P (atol 1e-4, as the
test), and stops if not. The ratios are medians over rounds of per-round ratios (all calls of a round run
moments apart, which cancels slow drifts of machine load); one warm-up round first.

    python bench/bench_torchcam.py                       # ViT-B/16, 224 px, B=1, L=2, P = 1 4 8, 1 thread
    python bench/bench_torchcam.py --small --repeats 1   # a shrunk ViT, seconds
    python bench/bench_torchcam.py --classes 1 4 8 16 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics

import torch
from common import time_rounds

ATOL = 1e-4  # tests/test_classifiers.py's tolerance against torchcam


def build(small: bool, device: str) -> tuple[torch.nn.Module, int]:
    """``(model, image size)``: random-init torchvision ViT-B/16, or a shrunk VisionTransformer with ``small``."""
    import torchvision

    torch.manual_seed(0)
    if small:
        model = torchvision.models.vision_transformer.VisionTransformer(
            image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=16)
        size = 32
    else:
        model = torchvision.models.vit_b_16(weights=None)
        size = 224
    with torch.no_grad():  # torchvision starts the head at zero: logits all 0, maps flat
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        torch.nn.init.normal_(model.heads.head.bias, std=0.02)
    return model.to(device).eval(), size


def pick_classes(num_classes: int, p: int) -> list[int]:
    """``p`` distinct class indices, fixed by a seed (the first ``p`` of one permutation)."""
    if p > num_classes:
        raise SystemExit(f"P={p} exceeds the model's {num_classes} classes")
    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(1))[:p].tolist()


class TorchcamRunner:
    """torchcam 0.5's ``LeGrad`` on a deep copy of ``model`` with hooks on its last ``num_layers`` blocks."""

    def __init__(self, model: torch.nn.Module, num_layers: int):
        from torchcam.methods import LeGrad

        self.model = copy.deepcopy(model).eval()
        self.extractor = LeGrad(self.model, list(self.model.encoder.layers)[-num_layers:])

    def per_class(self, image: torch.Tensor, classes: list[int]) -> torch.Tensor:
        """One hooked forward and one extractor call per class (torchcam's documented use)."""
        out = []
        for c in classes:
            scores = self.model(image)
            out.append(self.extractor(class_idx=c, scores=scores)[0].detach())
        return torch.stack(out, dim=1)

    def one_forward(self, image: torch.Tensor, classes: list[int]) -> torch.Tensor:
        """One hooked forward, then one extractor call per class, keeping the graph for the next class."""
        scores = self.model(image)
        out = [self.extractor(class_idx=c, scores=scores, retain_graph=i < len(classes) - 1)[0].detach()
               for i, c in enumerate(classes)]
        return torch.stack(out, dim=1)

    def close(self) -> None:
        self.extractor.remove_hooks()


def check_same_maps(wrapper, cam: TorchcamRunner, image: torch.Tensor, classes: list[int]) -> dict:
    """legrad's grid maps vs both torchcam uses: max absolute differences, and whether all are within ATOL."""
    ours = wrapper.compute_legrad(image=image, target=classes, output_size="grid").detach()
    diffs = {}
    for name, theirs in (("torchcam", cam.per_class(image, classes)), ("torchcam_1fwd", cam.one_forward(image, classes))):
        if theirs.shape != ours.shape:
            raise SystemExit(f"maps differ in shape: legrad {tuple(ours.shape)}, {name} {tuple(theirs.shape)}")
        diffs[name] = (ours - theirs).abs().max().item()
    return {"P": len(classes), "shape": list(ours.shape), "atol": ATOL, "max_abs_diff": diffs,
            "maps_equal": all(d <= ATOL for d in diffs.values())}


def time_class_counts(model, wrapper, cam: TorchcamRunner, image: torch.Tensor, counts: list[int], reps: int,
                      device: str) -> list[dict]:
    """One row per class count: median seconds of each call and median per-round ratios."""

    def forward():
        with torch.no_grad():
            model(image)

    rows = []
    for p in counts:
        classes = pick_classes(model.heads.head.out_features, p)
        t = time_rounds({
            "forward": forward,
            "legrad": lambda c=classes: wrapper.compute_legrad(image=image, target=c, output_size="grid"),
            "torchcam": lambda c=classes: cam.per_class(image, c),
            "torchcam_1fwd": lambda c=classes: cam.one_forward(image, c),
        }, reps, device)

        def ratio(num: str, den: str, t=t) -> float:
            return statistics.median(a / b for a, b in zip(t[num], t[den], strict=True))

        rows.append({"P": p, "classes": classes, "rounds": len(t["forward"]),
                     **{f"{name}_s": statistics.median(v) for name, v in t.items()},
                     "legrad_per_forward": ratio("legrad", "forward"),
                     "torchcam_per_forward": ratio("torchcam", "forward"),
                     "torchcam_per_legrad": ratio("torchcam", "legrad"),
                     "torchcam_1fwd_per_forward": ratio("torchcam_1fwd", "forward"),
                     "torchcam_1fwd_per_legrad": ratio("torchcam_1fwd", "legrad")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a shrunk VisionTransformer (32 px, 4 blocks, width 32)")
    parser.add_argument("--classes", type=int, nargs="+", default=[1, 4, 8], help="class counts P")
    parser.add_argument("--layers", type=int, default=2, help="explained blocks L (legrad layer_index=-L)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", "--reps", type=int, default=7, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="PATH", help="also write the check and the rows as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import torchcam

    from legrad import LeWrapper

    model, size = build(args.small, args.device)
    image = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(2)).to(args.device)
    wrapper = LeWrapper(model, layer_index=-args.layers)
    cam = TorchcamRunner(model, args.layers)
    meta = {"model": "small VisionTransformer" if args.small else "vit_b_16", "size": size, "batch": args.batch,
            "layers": args.layers, "threads": torch.get_num_threads(), "device": args.device,
            "torch": torch.__version__, "torchcam": torchcam.__version__, "python": platform.python_version()}
    print(" ".join(f"{k}={v}" for k, v in meta.items()), flush=True)

    check = check_same_maps(wrapper, cam, image, pick_classes(model.heads.head.out_features, max(args.classes)))
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in check["max_abs_diff"].items())
    print(f"maps check (P={check['P']}, {check['shape']}): max |legrad - x| = {diffs}; atol {ATOL}: "
          f"{'same maps' if check['maps_equal'] else 'DIFFERENT MAPS'}", flush=True)
    if not check["maps_equal"]:
        raise SystemExit("legrad and torchcam computed different maps: the timings would not compare equal work")

    rows = time_class_counts(model, wrapper, cam, image, args.classes, args.repeats, args.device)
    cam.close()
    print(f"medians over {args.repeats} rounds after a warm-up round; ratios: medians of per-round ratios")
    print("| P | forward (s) | legrad (s) | torchcam (s) | torchcam 1-fwd (s) | legrad / forward | "
          "torchcam / forward | torchcam / legrad | torchcam 1-fwd / forward | torchcam 1-fwd / legrad |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['P']} | {r['forward_s']:.3f} | {r['legrad_s']:.3f} | {r['torchcam_s']:.3f} | "
              f"{r['torchcam_1fwd_s']:.3f} | {r['legrad_per_forward']:.2f}x | {r['torchcam_per_forward']:.2f}x | "
              f"**{r['torchcam_per_legrad']:.2f}x** | {r['torchcam_1fwd_per_forward']:.2f}x | "
              f"{r['torchcam_1fwd_per_legrad']:.2f}x |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": {**meta, "repeats": args.repeats}, "check": check, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
