"""Failing fast when model weights must be downloaded and their host is unreachable.

Without these checks, the Hugging Face Hub client retries with backoff for about a minute before giving
up. The probes are skipped when a proxy or an offline mode is configured (the clients handle those
themselves) and when the weights are already cached.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from urllib.parse import urlparse

from ..io.errors import ModelLoadError, one_line

__all__ = ["offline_or_proxied", "hub_cached", "weights_cached", "check_download_reachable"]

_CLIENT_SETTINGS = {"https_proxy", "http_proxy", "all_proxy", "hf_hub_offline", "transformers_offline"}


def offline_or_proxied() -> bool:
    """Whether a proxy or an offline mode is set in the environment (then the download clients decide)."""
    return bool({k.lower() for k, v in os.environ.items() if v} & _CLIENT_SETTINGS)


def hub_cached(repo: str, files: Sequence[str]) -> bool:
    """Whether one of ``files`` of the Hugging Face Hub repository ``repo`` is in the local Hub cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in files)


def weights_cached(pretrained_cfg: dict) -> bool:
    """Whether open_clip would find these weights in its local caches (Hugging Face Hub or URL cache).

    Args:
        pretrained_cfg: an open_clip pretrained config (``hf_hub`` and/or ``url`` keys).
    """
    hub = pretrained_cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith(".bin"):
            candidates.insert(0, filename[: -len(".bin")] + ".safetensors")
        return hub_cached(repo_id, candidates)
    url = pretrained_cfg.get("url", "")
    if url:
        return os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)))
    return False


def check_download_reachable(url: str | None, what: str, alternative: str = "or use --pretrained none for random "
                             "weights", local: str = "give a local checkpoint file as pretrained (--pretrained PATH)"
                             ) -> None:
    """Raises at once when ``url``'s host (the Hugging Face Hub when None) is unreachable, instead of letting
    a download client retry for a minute. No-op when a proxy or an offline mode is configured.

    Args:
        url: the download URL, or None for the Hugging Face Hub (``HF_ENDPOINT``).
        what: what would be downloaded, for the message (``"'openai' weights of ViT-B-16"``).
        alternative: the last suggestion of the message.
        local: how to use weights already on disk instead (what the model's front-end options allow).

    Raises:
        ModelLoadError: the host does not accept a connection within 5 s.
    """

    if offline_or_proxied():
        return
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    host = urlparse(url or endpoint).hostname
    if not host:
        return
    try:
        socket.create_connection((host, 443), timeout=5.0).close()
    except OSError as exc:
        raise ModelLoadError(
            f"cannot download the {what}: {host} is unreachable ({one_line(exc, 80)}) and they are not in "
            f"the local cache; connect to the internet once, or {local}, {alternative}"
        ) from exc
