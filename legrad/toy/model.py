"""The bundled demo CLIP: configuration, compact checkpoint storage and loading.

The model is a plain ``open_clip.CLIP`` (a ``VisionTransformer`` image tower with CLS pooling and
open_clip's text transformer with its standard BPE tokenizer) trained on `legrad.toy.scenes`.

The checkpoint stores every weight in fp16 except the token-embedding table, of which only the
rows for tokens the vocabulary uses (plus the start/end tokens) are kept; the other 49k rows are
rebuilt as zeros at load time. Prompts made of other words therefore give meaningless embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from legrad.toy.scenes import VOCABULARY

__all__ = [
    "CHECKPOINT_PATH",
    "LAYER_INDEX",
    "ToyConfig",
    "build_model",
    "known_token_ids",
    "load_checkpoint",
    "load_model",
    "make_preprocess",
    "make_tokenizer",
    "save_checkpoint",
]

#: Recommended ``layer_index`` for `LeWrapper` on the demo model (chosen with
#: ``bench/toy_localization.py``; see the README section "The bundled demo model"): LeGrad aggregates the blocks from
#: this index to the last one.
LAYER_INDEX: int = 0

#: Where the bundled checkpoint lives (package data).
CHECKPOINT_PATH: Path = Path(__file__).resolve().parent.parent / "assets" / "toy_clip.pt"

_FORMAT_VERSION = 1

#: Extra words, besides those of `VOCABULARY`, whose token rows are kept in the checkpoint.
EXTRA_WORDS: tuple[str, ...] = ("and", ",")


@dataclass(frozen=True)
class ToyConfig:
    """Architecture and preprocessing of the demo model.

    Attributes:
        embed_dim: Joint embedding size.
        image_size: Input side in pixels.
        patch_size: ViT patch side in pixels.
        vision_width: Image transformer width.
        vision_layers: Image transformer blocks.
        vision_head_width: Width per attention head in the image tower.
        pos_embed_type: open_clip image position embedding, ``"learnable"`` or ``"sin_cos_2d"``
            (fixed 2-D sine-cosine table).
        pool_type: open_clip image pooling, ``"tok"`` (CLS token) or ``"avg"`` (mean of the patch
            tokens, the feature LeGrad scores at every block).
        text_width: Text transformer width.
        text_heads: Text transformer heads.
        text_layers: Text transformer blocks.
        context_length: Text context length in tokens.
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation std.
    """

    embed_dim: int = 128
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 6
    vision_head_width: int = 32
    pos_embed_type: str = "learnable"
    pool_type: str = "tok"
    text_width: int = 128
    text_heads: int = 4
    text_layers: int = 3
    context_length: int = 24
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToyConfig:
        """Build a config from `asdict` output (lists become tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def build_model(cfg: ToyConfig, vocab_size: int | None = None) -> torch.nn.Module:
    """Build a randomly initialised ``open_clip.CLIP`` for ``cfg``.

    Args:
        cfg: The configuration.
        vocab_size: Rows of the token-embedding table; the full BPE vocabulary when None
            (training uses a compact table indexed by `known_token_ids` positions).

    Returns:
        The model, in train mode.
    """
    import open_clip

    vision_cfg = dict(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        width=cfg.vision_width,
        layers=cfg.vision_layers,
        head_width=cfg.vision_head_width,
        pos_embed_type=cfg.pos_embed_type,
        pool_type=cfg.pool_type,
    )
    text_cfg = dict(
        context_length=cfg.context_length,
        width=cfg.text_width,
        heads=cfg.text_heads,
        layers=cfg.text_layers,
    )
    if vocab_size is not None:
        text_cfg["vocab_size"] = vocab_size
    return open_clip.CLIP(embed_dim=cfg.embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg)


def make_preprocess(cfg: ToyConfig) -> Callable:
    """Return the inference preprocess (PIL image -> normalised tensor) for ``cfg``."""
    import open_clip

    return open_clip.image_transform(cfg.image_size, is_train=False, mean=cfg.mean, std=cfg.std)


def make_tokenizer(cfg: ToyConfig) -> Callable:
    """Return open_clip's standard BPE tokenizer with the model's context length."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=cfg.context_length)


def known_token_ids(tokenizer: Callable, texts: Iterable[str] = ()) -> list[int]:
    """Token ids used by `VOCABULARY`, `EXTRA_WORDS`, ``texts`` and the special tokens.

    Args:
        tokenizer: An open_clip tokenizer.
        texts: Further texts whose tokens should be kept.

    Returns:
        Sorted unique token ids (padding id 0 included).
    """
    all_texts = list(VOCABULARY) + list(EXTRA_WORDS) + list(texts)
    ids = tokenizer(all_texts)
    return sorted({int(i) for i in ids.flatten().tolist()} | {0})


def save_checkpoint(
    model: torch.nn.Module,
    cfg: ToyConfig,
    path: str | Path,
    token_ids: list[int],
    meta: dict[str, Any] | None = None,
    half: bool = True,
) -> None:
    """Save ``model`` compactly: fp16 weights and only the given token-embedding rows.

    Args:
        model: The trained model.
        cfg: Its configuration.
        path: Output file.
        token_ids: Rows of the token-embedding table to keep. When the model's table has exactly
            ``len(token_ids)`` rows it is taken to be that compact table already.
        meta: Extra JSON-like metadata (training command, metrics...).
        half: Store floating tensors in fp16.
    """
    dtype = torch.float16 if half else torch.float32
    state = {}
    for name, t in model.state_dict().items():
        if name == "token_embedding.weight":
            continue
        t = t.detach().cpu()
        state[name] = t.to(dtype) if t.is_floating_point() else t
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long)
    table = model.token_embedding.weight.detach().cpu()
    rows = (table if table.shape[0] == len(ids) else table[ids]).to(dtype)
    payload = {
        "format": _FORMAT_VERSION,
        "config": asdict(cfg),
        "state_dict": state,
        "token_ids": ids,
        "token_rows": rows,
        "meta": meta or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ToyConfig, dict]:
    """Load a checkpoint written by `save_checkpoint`.

    Args:
        path: The checkpoint file.
        device: Where to put the model.

    Returns:
        ``(model, cfg, meta)`` with the model in eval mode, fp32.
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != _FORMAT_VERSION:
        raise ValueError(f"unsupported toy checkpoint format {payload.get('format')!r} in {path}")
    cfg = ToyConfig.from_dict(payload["config"])
    model = build_model(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    table = torch.zeros_like(model.token_embedding.weight)
    table[payload["token_ids"]] = payload["token_rows"].float()
    state["token_embedding.weight"] = table
    model.load_state_dict(state, strict=True)
    model.eval()
    return model.to(device), cfg, payload["meta"]


def load_model(
    device: str | torch.device = "cpu", path: str | Path | None = None
) -> tuple[torch.nn.Module, Callable, Callable]:
    """Load the bundled demo CLIP, offline.

    Args:
        device: Where to put the model.
        path: A checkpoint to load instead of the bundled one.

    Returns:
        ``(model, preprocess, tokenizer)``: a plain ``open_clip.CLIP`` in eval mode, its image
        preprocess (PIL -> tensor) and its tokenizer (list of str -> LongTensor).
    """
    model, cfg, _ = load_checkpoint(CHECKPOINT_PATH if path is None else path, device)
    return model, make_preprocess(cfg), make_tokenizer(cfg)
