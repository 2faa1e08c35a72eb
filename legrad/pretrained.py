"""Which OpenCLIP ``(model, pretrained)`` pairs this library can explain."""

from __future__ import annotations

import functools

from .adapters.registry import adapter_classes

__all__ = ["list_pretrained", "supports_model_config", "format_table"]


def supports_model_config(model_name: str) -> bool:
    """Whether the OpenCLIP config ``model_name`` builds an image tower some adapter supports.

    Decided from the config's tower description (type and flags), not from the name.
    """
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        return False
    return any(cls.supports_config(cfg) for cls in adapter_classes())


@functools.lru_cache(maxsize=1)
def _pairs() -> tuple[tuple[str, str], ...]:
    import open_clip

    seen: set[tuple[str, str]] = set()
    out = []
    support: dict[str, bool] = {}
    for name, tag in open_clip.list_pretrained():
        if name not in support:
            support[name] = supports_model_config(name)
        if support[name] and (name, tag) not in seen:
            seen.add((name, tag))
            out.append((name, tag))
    return tuple(out)


def list_pretrained(as_table: bool = False) -> list[tuple[str, str]] | str:
    """The ``(model_name, pretrained_tag)`` pairs of ``open_clip.list_pretrained()`` that LeGrad supports.

    Args:
        as_table: return a Markdown table (str) instead of the list.

    Returns:
        The supported pairs, without duplicates, in OpenCLIP's order (or their table).
    """
    pairs = list(_pairs())
    return format_table(pairs) if as_table else pairs


def format_table(pairs: list[tuple[str, str]]) -> str:
    """Markdown table of ``(model, pretrained)`` pairs."""
    lines = ["| model | pretrained |", "|---|---|"]
    lines += [f"| {m} | {t} |" for m, t in pairs]
    return "\n".join(lines)
