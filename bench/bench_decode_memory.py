"""Peak memory of decoding one image (``legrad.io.images.load_image``) against its pre-flight estimate.

For each case, a small file of a large image is written once (a deflate-compressed float32 TIFF of
50 Mpx is about 300 KB); a fresh subprocess then imports the loader, calls ``load_image`` on it and
reports the call's peak resident memory above the memory before it (``VmHWM`` reset through
``/proc/self/clear_refs``), the memory still held after it (the result dropped, ``gc`` run), and
``decode_bytes``, the estimate the loader checks before decoding. The estimate must be an upper bound
of the peak (ratio >= 1).

    python bench/bench_decode_memory.py
    python bench/bench_decode_memory.py --mpx 20 --cases float-range u16-png
    python bench/bench_decode_memory.py --legrad /path/to/an/older/checkout   # the same, with its loader

Linux only (``/proc``). Without torch: only numpy and Pillow are loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CASES = ("float-range", "float-unit", "u16-png", "jpeg-progressive", "rgba-png", "rgb-png")

_CHILD = r"""
import gc, json, sys
from legrad.io import images

def kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])

path = sys.argv[1]
gc.collect()
base = kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
im = images.load_image(path, max_pixels=None)
peak = kib("VmHWM") - base
size, mode = im.size, im.mode
del im
gc.collect()
held = kib("VmRSS") - base
estimate = None
if hasattr(images, "decode_bytes"):
    from PIL import Image
    with Image.open(path) as src:
        progressive = src.format == "JPEG" and bool(src.info.get("progressive"))
        estimate = images.decode_bytes(src.width, src.height, src.mode, jpeg_progressive=progressive)
print(json.dumps({"peak_bytes": peak * 1024, "held_bytes": held * 1024, "estimate_bytes": estimate,
                  "size": size, "mode": mode}))
"""


def write_case(case: str, mpx: float, folder: Path) -> Path:
    """Writes the image of ``case`` (about ``mpx`` megapixels, square) and returns its path."""
    side = int((mpx * 1e6) ** 0.5)
    # Steps, not a smooth ramp: long runs of equal values compress to a small file (the hostile case).
    ramp = np.floor(np.linspace(0.0, 16.0, side, endpoint=False, dtype=np.float32)) / 16
    if case in ("float-range", "float-unit"):
        values = np.add.outer(ramp, ramp) / 2  # in [0, 1]
        if case == "float-range":
            values = values * 1000 - 200  # outside [0, 1]: min-max scaling
        path = folder / f"{case}.tif"
        Image.fromarray(values.astype(np.float32), mode="F").save(path, compression="tiff_adobe_deflate")
    elif case == "u16-png":
        path = folder / f"{case}.png"
        Image.fromarray((np.add.outer(ramp, ramp) * 30000).astype(np.uint16)).save(path)
    else:
        grey = (np.add.outer(ramp, ramp) * 127).astype(np.uint8)
        rgb = np.stack([grey, grey[::-1], grey.T], axis=-1)
        if case == "jpeg-progressive":
            path = folder / f"{case}.jpg"
            Image.fromarray(rgb).save(path, "JPEG", progressive=True, quality=90, subsampling=0)
        elif case == "rgba-png":
            path = folder / f"{case}.png"
            Image.fromarray(np.concatenate([rgb, grey[..., None]], axis=-1), "RGBA").save(path, compress_level=1)
        else:
            path = folder / f"{case}.png"
            Image.fromarray(rgb).save(path, compress_level=1)
    return path


def measure(path: Path, legrad_root: Path) -> dict:
    """``{"peak_bytes", "held_bytes", "estimate_bytes", ...}`` of loading ``path`` in a fresh subprocess."""
    env = {**os.environ, "PYTHONPATH": str(legrad_root)}
    # cwd: the image's folder, so that ``python -c`` does not import the legrad of the current directory.
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, env=env,
                         cwd=path.parent, check=False, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "child failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mpx", type=float, default=50.0, help="megapixels of each image (default 50)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--legrad", type=Path, default=REPO, help="checkout whose loader is measured (default: this one)")
    args = p.parse_args()
    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'case':18} {'file KiB':>9} {'peak MiB':>9} {'held MiB':>9} {'estimate MiB':>13} {'ratio':>6}")
        for case in args.cases:
            path = write_case(case, args.mpx, Path(tmp))
            r = measure(path, args.legrad)
            est = r["estimate_bytes"]
            ratio = f"{est / r['peak_bytes']:.2f}" if est and r["peak_bytes"] > 0 else "-"
            est_text = f"{est / mib:,.0f}" if est else "-"
            print(f"{case:18} {path.stat().st_size / 1024:9,.0f} {r['peak_bytes'] / mib:9,.0f} "
                  f"{r['held_bytes'] / mib:9,.0f} {est_text:>13} {ratio:>6}")


if __name__ == "__main__":
    main()
