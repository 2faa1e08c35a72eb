"""The bundled demo CLIP: configuration, compact checkpoint storage and loading.

The model is a plain ``open_clip.CLIP`` (a ``VisionTransformer`` image tower with CLS pooling and
open_clip's text transformer with its standard BPE tokenizer) trained on `legrad.toy.scenes`.

The checkpoint stores every weight in fp16 except the token-embedding table, of which only the
rows for tokens the vocabulary uses (plus the start/end tokens) are kept; the other 49k rows are
rebuilt as zeros at load time. Prompts made of other words therefore give meaningless embeddings.

The model was trained on images normalised with mean 0.5 / std 0.25 (`ToyConfig`'s defaults, what
the checkpoint records). At load time that normalisation is folded into the patch embedding
(`fold_normalization`, exact) so that the loaded model, like most OpenCLIP models, takes images
normalised with OpenAI's CLIP statistics; tools that assume them (``legrad.viz.visualize``'s
default un-normalisation) then show true colours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from legrad.preprocess import OPENAI_MEAN, OPENAI_STD
from legrad.toy.scenes import VOCABULARY

__all__ = [
    "CHECKPOINT_PATH",
    "LAYER_INDEX",
    "recommended_layer_index",
    "ToyConfig",
    "build_model",
    "create_model_and_transforms",
    "fold_normalization",
    "get_tokenizer",
    "known_token_ids",
    "load_checkpoint",
    "load_model",
    "make_preprocess",
    "make_tokenizer",
    "save_checkpoint",
]

#: Recommended ``layer_index`` for `LeWrapper` on the demo model (chosen on validation scenes with
#: ``bench/toy_demo_quality.py --layer-index``; see docs/demo_model.md): LeGrad aggregates the blocks
#: from this index to the last one (6: the last six of twelve).
LAYER_INDEX: int = 6

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
        mean: Per-channel normalisation mean the weights expect (training used 0.5; models from
            `load_checkpoint` take OpenAI's CLIP mean, see `fold_normalization`).
        std: Per-channel normalisation std (training used 0.25; OpenAI's after loading).
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


def fold_normalization(
    model: torch.nn.Module,
    cfg: ToyConfig,
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
) -> ToyConfig:
    """Makes ``model`` take images normalised with ``mean``/``std`` instead of ``cfg``'s, exactly.

    A pixel ``p`` normalised the old way is ``x_old = a * x_new + b`` with ``a = std / cfg.std`` and
    ``b = (mean - cfg.mean) / cfg.std`` per channel. The patch embedding is linear and has no padding
    (stride = kernel), so ``conv(x_old) = conv_{W * a}(x_new) + conv_W(b)``, where the second term is
    the same vector for every patch. open_clip's ``conv1`` has no bias, so that vector is added to
    the patch rows of the positional embedding (not the CLS row). Resampling the position table for
    another grid (bicubic, weights summing to one) keeps a constant offset, so the fold stays exact
    at any input size; a sine-cosine table *rebuilt* for a new grid would lose it (training from a
    checkpoint therefore loads it unfolded).

    Args:
        model: an open_clip ``CLIP`` with a ``VisionTransformer`` image tower; modified in place.
        cfg: its configuration; ``cfg.mean``/``cfg.std`` are the statistics it takes now.
        mean: the per-channel mean it should take.
        std: the per-channel std it should take.

    Returns:
        ``cfg`` with ``mean`` and ``std`` replaced.

    Raises:
        ValueError: if a std is not positive or the patch embedding has padding or a bias.
    """
    old_m = torch.tensor(cfg.mean, dtype=torch.float64)
    old_s = torch.tensor(cfg.std, dtype=torch.float64)
    new_m = torch.tensor(mean, dtype=torch.float64)
    new_s = torch.tensor(std, dtype=torch.float64)
    if (old_s <= 0).any() or (new_s <= 0).any():
        raise ValueError(f"normalisation stds must be positive, got {cfg.std} and {std}")
    conv = model.visual.conv1
    if conv.bias is not None or any(conv.padding) or tuple(conv.stride) != tuple(conv.kernel_size):
        raise ValueError("fold_normalization needs a bias-free, unpadded patch embedding (stride = kernel)")
    scale = new_s / old_s
    shift = (new_m - old_m) / old_s
    weight = conv.weight.detach().to(torch.float64)
    offset = (weight * shift.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))  # [width]
    pos = model.visual.positional_embedding
    with torch.no_grad():
        conv.weight.copy_((weight * scale.view(1, -1, 1, 1)).to(conv.weight.dtype))
        pos[1:].copy_((pos[1:].to(torch.float64) + offset).to(pos.dtype))
    return replace(cfg, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))


def recommended_layer_index(depth: int) -> int:
    """The recommended first explained block of a demo-model checkpoint with ``depth`` image blocks.

    `LAYER_INDEX` was tuned on the bundled checkpoint; a checkpoint too shallow to have that block (one
    trained with ``--vision-layers 6``, say) gets LeWrapper's general default, ``-2``.
    """
    return LAYER_INDEX if 0 <= LAYER_INDEX < depth else -2


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", fold: bool = True
) -> tuple[torch.nn.Module, ToyConfig, dict]:
    """Load a checkpoint written by `save_checkpoint`.

    Args:
        path: The checkpoint file.
        device: Where to put the model.
        fold: Fold the training normalisation into the weights so that the model takes OpenAI's CLIP
            statistics (`fold_normalization`); False gives the weights as stored (for training).

    Returns:
        ``(model, cfg, meta)`` with the model in eval mode, fp32; ``cfg.mean``/``cfg.std`` are the
        statistics the returned model takes. The model carries ``legrad_layer_index``
        (`recommended_layer_index`), which `legrad.LeWrapper` uses when no ``layer_index`` is given.
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
    if fold and (tuple(cfg.mean), tuple(cfg.std)) != (tuple(OPENAI_MEAN), tuple(OPENAI_STD)):
        cfg = fold_normalization(model, cfg)
    # What open_clip's factory records for its models (legrad.viz reads it for normalization=model).
    model.visual.preprocess_cfg = {"size": cfg.image_size, "mean": cfg.mean, "std": cfg.std}
    model.legrad_layer_index = recommended_layer_index(cfg.vision_layers)
    return model.to(device), cfg, payload["meta"]


def load_model(
    device: str | torch.device = "cpu", path: str | Path | None = None
) -> tuple[torch.nn.Module, Callable, Callable]:
    """Load the bundled demo CLIP, offline.

    Args:
        device: Where to put the model.
        path: A checkpoint to load instead of the bundled one.

    Returns:
        ``(model, preprocess, tokenizer)``: a plain ``open_clip.CLIP`` in eval mode that takes images
        normalised with OpenAI's CLIP mean/std, its image preprocess (PIL -> tensor, those
        statistics) and its tokenizer (list of str -> LongTensor). ``LeWrapper(model)`` uses the
        model's recommended ``layer_index`` (`LAYER_INDEX`).
    """
    model, cfg, _ = load_checkpoint(CHECKPOINT_PATH if path is None else path, device)
    return model, make_preprocess(cfg), make_tokenizer(cfg)


def create_model_and_transforms(
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, Callable, Callable]:
    """`load_model` in ``open_clip.create_model_and_transforms``'s shape, for open_clip-style code.

    ``model, _, preprocess = create_model_and_transforms()`` then reads like the open_clip original;
    swapping in a real model is a change of this one line (and of `get_tokenizer`).

    Args:
        device: Where to put the model.

    Returns:
        ``(model, preprocess, preprocess)``: the demo model has no training augmentation, so both
        transforms are the inference preprocess.
    """
    model, preprocess, _ = load_model(device)
    return model, preprocess, preprocess


def get_tokenizer() -> Callable:
    """The bundled demo model's tokenizer (``open_clip.get_tokenizer``'s counterpart): list of str -> LongTensor."""
    payload = torch.load(CHECKPOINT_PATH, map_location="cpu", weights_only=True)
    return make_tokenizer(ToyConfig.from_dict(payload["config"]))
