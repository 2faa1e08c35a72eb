"""The transformers releases the VLM path runs on: the language model runs its own ``forward`` with the image
features given as ``mm_encoder_outputs``, which every supported family's forward takes from transformers 5.18.0 on
(5.17 and earlier have no such argument). Checked when a VLM is wrapped, before any work."""

from __future__ import annotations

import re

__all__ = ["MIN_TRANSFORMERS", "check_transformers", "installed_transformers"]

#: The first transformers release whose VLM forwards (every family of ``FAMILIES``) take ``mm_encoder_outputs``.
MIN_TRANSFORMERS = "5.18.0"


def _release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string (``"5.18.0.dev0"`` -> ``(5, 18, 0)``; a pre-release counts as
    its release)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise ValueError(f"cannot read the transformers version {version!r}")
    parts = [int(p) for p in match.group(1).split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def installed_transformers() -> str:
    """The installed transformers' version string."""
    import transformers

    return str(transformers.__version__)


def check_transformers(installed: str | None = None) -> None:
    """Refuses a transformers older than :data:`MIN_TRANSFORMERS`.

    Args:
        installed: the version to check (None: :func:`installed_transformers`).

    Raises:
        TypeError: naming the installed version, the minimum and the fix.
    """
    if installed is None:
        installed = installed_transformers()
    if _release(installed) < _release(MIN_TRANSFORMERS):
        raise TypeError(f"legrad explains vision-language models with transformers >= {MIN_TRANSFORMERS} (their "
                        f"forwards take the image features as mm_encoder_outputs); transformers {installed} is "
                        f"installed: pip install 'transformers>={MIN_TRANSFORMERS},<6'")
