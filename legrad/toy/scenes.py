"""Synthetic scenes of coloured shapes with exact object masks.

Every scene holds one to three non-overlapping objects (a colour and a shape, e.g. "a red circle")
drawn on a plain or lightly textured background. Each object's mask is rasterised with the same
primitive as the drawn shape, so the masks are exactly the pixels that carry the object's colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "SHAPES",
    "VOCABULARY",
    "Scene",
    "SceneObject",
    "make_scene",
    "make_scenes",
    "phrase_for",
    "draw_sample_scenes",
]

#: Shape names, in vocabulary order.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")

#: Colour names and their nominal RGB values (objects jitter around these).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 15),
    "yellow": (240, 220, 30),
    "green": (35, 165, 55),
    "blue": (35, 75, 220),
    "purple": (135, 50, 185),
    "cyan": (30, 200, 215),
    "pink": (245, 120, 195),
}


def phrase_for(colour: str, shape: str) -> str:
    """Return the phrase naming an object, e.g. ``"a red circle"``.

    Args:
        colour: A key of `COLOURS`.
        shape: An entry of `SHAPES`.

    Returns:
        The phrase.
    """
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape}"


#: Every phrase the demo model knows, colour-major: "a red circle", "a red square", ...
VOCABULARY: tuple[str, ...] = tuple(phrase_for(c, s) for c in COLOURS for s in SHAPES)

_MIN_OBJECTS, _MAX_OBJECTS = 1, 3
# Object radius (half-extent of its bounding circle) as a fraction of the image side.
_MIN_RADIUS, _MAX_RADIUS = 0.10, 0.21
# Triangles and stars fill less of their bounding circle; draw them larger so areas are comparable.
_SHAPE_SCALE = {"triangle": 1.15, "star": 1.15}
_COLOUR_JITTER = 12
_BG_LEVEL = (95, 170)  # neutral grey background; every object colour is saturated
_BG_TINT = 14
_MAX_NOISE = 6.0


@dataclass
class SceneObject:
    """One object of a scene.

    Attributes:
        colour: Colour name (a key of `COLOURS`).
        shape: Shape name (an entry of `SHAPES`).
        mask: Boolean ``(H, W)`` array, True where the object is drawn.
        rgb: The exact fill colour used to draw it.
        center: ``(x, y)`` centre in pixels.
        radius: Radius of the bounding circle in pixels.
    """

    colour: str
    shape: str
    mask: np.ndarray
    rgb: tuple[int, int, int]
    center: tuple[float, float]
    radius: float

    @property
    def phrase(self) -> str:
        """The phrase naming this object, e.g. ``"a red circle"``."""
        return phrase_for(self.colour, self.shape)


@dataclass
class Scene:
    """A synthetic image with its caption and per-object masks.

    Attributes:
        image: The RGB image.
        objects: The objects in the scene, left to right.
        caption: A whole-scene caption, e.g. ``"a red circle and a blue star"``.
    """

    image: Image.Image
    objects: list[SceneObject] = field(default_factory=list)
    caption: str = ""

    @property
    def phrases(self) -> list[str]:
        """The phrases of the objects, in order."""
        return [o.phrase for o in self.objects]


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices of a shape inside the unit circle, centred at the origin, y pointing down."""
    if shape == "square":
        h = 0.7
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":
        # Equilateral, circumradius 1, apex up; shifted so its bounding box is centred vertically.
        pts = [(math.cos(a), -math.sin(a)) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
        return [(x, y + 0.25) for x, y in pts]
    if shape == "cross":
        a, t = 0.95, 0.3
        return [(-t, -a), (t, -a), (t, -t), (a, -t), (a, t), (t, t),
                (t, a), (-t, a), (-t, t), (-a, t), (-a, -t), (-t, -t)]  # fmt: skip
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            ang = math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(ang), -r * math.sin(ang)))
        return pts
    raise ValueError(f"no polygon for shape {shape!r}")


_MAX_ROTATION = {"square": 20.0, "triangle": 20.0, "cross": 20.0, "star": 36.0}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float, fill) -> None:
    """Draw one filled shape (used identically for the image and the mask)."""
    if shape == "circle":
        rr = 0.85 * r
        draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=fill)
        return
    c, s = math.cos(rot), math.sin(rot)
    pts = [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in _unit_polygon(shape)]
    draw.polygon(pts, fill=fill)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A plain or lightly textured greyish background as a float ``(H, W, 3)`` array."""
    level = rng.uniform(*_BG_LEVEL)
    base = level + rng.uniform(-_BG_TINT, _BG_TINT, size=3)
    bg = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 1:  # linear gradient
        ang = rng.uniform(0, 2 * math.pi)
        ramp = (xx - 0.5) * math.cos(ang) + (yy - 0.5) * math.sin(ang)
        bg = bg + rng.uniform(10, 30) * ramp[..., None]
    elif kind == 2:  # faint stripes
        ang = rng.uniform(0, math.pi)
        freq = rng.uniform(3, 8)
        wave = np.sin(2 * math.pi * freq * (xx * math.cos(ang) + yy * math.sin(ang)))
        bg = bg + rng.uniform(4, 10) * wave[..., None]
    elif kind == 3:  # blotchy low-frequency texture
        coarse = rng.normal(0, 1, size=(5, 5)).astype(np.float32)
        tex = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
        bg = bg + rng.uniform(4, 10) * tex[..., None]
    return bg


def make_scene(
    rng: np.random.Generator | int,
    size: int = 64,
    n_objects: int | None = None,
    radius_range: tuple[float, float] | None = None,
) -> Scene:
    """Draw one random scene.

    Args:
        rng: A numpy Generator (advanced in place) or an integer seed.
        size: Side of the square image in pixels.
        n_objects: Number of objects; random in 1..3 when None (fewer if they do not fit).
        radius_range: Object radius range as fractions of ``size``; (0.10, 0.21) when None.

    Returns:
        The scene, with objects sorted left to right and distinct phrases.
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    if n_objects is None:
        n_objects = int(rng.integers(_MIN_OBJECTS, _MAX_OBJECTS + 1))
    if not _MIN_OBJECTS <= n_objects <= _MAX_OBJECTS:
        raise ValueError(f"n_objects must be in [{_MIN_OBJECTS}, {_MAX_OBJECTS}], got {n_objects}")

    lo, hi = (_MIN_RADIUS, _MAX_RADIUS) if radius_range is None else radius_range
    colours = list(COLOURS)
    placed: list[tuple[float, float, float]] = []
    kinds: list[tuple[str, str]] = []
    margin = max(1.0, 0.03 * size)
    for _ in range(n_objects):
        while True:
            kind = (colours[int(rng.integers(len(colours)))], SHAPES[int(rng.integers(len(SHAPES)))])
            if kind not in kinds:
                break
        scale = _SHAPE_SCALE.get(kind[1], 1.0)
        for _attempt in range(100):
            r = rng.uniform(lo, hi) * size * scale
            cx = rng.uniform(r + 1, size - r - 1)
            cy = rng.uniform(r + 1, size - r - 1)
            if all(math.hypot(cx - x, cy - y) >= r + q + margin for x, y, q in placed):
                break
        else:  # could not place another object; keep the scene smaller
            break
        placed.append((cx, cy, r))
        kinds.append(kind)

    img = Image.fromarray(np.clip(_background(rng, size), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    objects: list[SceneObject] = []
    for (cx, cy, r), (colour, shape) in zip(placed, kinds):
        rgb = tuple(int(np.clip(v + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1), 0, 255)) for v in COLOURS[colour])
        rot = math.radians(rng.uniform(-1, 1) * _MAX_ROTATION.get(shape, 0.0))
        _draw_shape(draw, shape, cx, cy, r, rot, rgb)
        m = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(m), shape, cx, cy, r, rot, 255)
        objects.append(SceneObject(colour, shape, np.asarray(m) > 0, rgb, (cx, cy), r))  # type: ignore[arg-type]

    noise = rng.uniform(0, _MAX_NOISE)
    if noise > 1.0:
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, noise, size=(size, size, 3))
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "RGB")

    objects.sort(key=lambda o: o.center[0])
    phrases = [o.phrase for o in objects]
    caption = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return Scene(image=img, objects=objects, caption=caption)


def make_scenes(n: int, seed: int, size: int = 64, n_objects: int | None = None) -> list[Scene]:
    """Draw ``n`` scenes deterministically from ``seed``.

    Args:
        n: Number of scenes.
        seed: Seed of the random stream; the same seed gives the same scenes.
        size: Side of the square images in pixels.
        n_objects: Objects per scene; random in 1..3 when None.

    Returns:
        The scenes.
    """
    rng = np.random.default_rng(seed)
    return [make_scene(rng, size=size, n_objects=n_objects) for _ in range(n)]


def draw_sample_scenes(n: int = 6, seed: int = 7, size: int = 192) -> list[Scene]:
    """The demo scenes shipped in ``legrad/assets/scenes/`` (``scripts/make_sample_scenes.py``), drawn again with their masks.

    Drawn deterministically from ``seed``, with no selection by model quality: the first scenes with
    2-3 objects, the last slot kept for one where two objects share a colour (the hard case).

    Args:
        n: Number of scenes.
        seed: Seed of the random stream.
        size: Side of the square images in pixels.

    Returns:
        The scenes.
    """
    rng = np.random.default_rng(seed)
    chosen: list[Scene] = []
    have_shared = False
    while len(chosen) < n:
        scene = make_scene(rng, size=size)
        colours = [o.colour for o in scene.objects]
        shared = len(set(colours)) < len(colours)
        if len(scene.objects) < 2:
            continue
        if len(chosen) == n - 1 and not have_shared and not shared:
            continue
        have_shared |= shared
        chosen.append(scene)
    return chosen
