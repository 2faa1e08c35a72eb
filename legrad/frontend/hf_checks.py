"""Safety checks of the front ends' transformers loads (``hf:REPO_OR_DIR`` classifiers and local VLMs).

* **No custom code.** A model folder (or Hub repository) can ship Python files and name them in an
  ``auto_map``; for a ``model_type`` transformers does not know, transformers then asks on the terminal
  whether to run them, and answering (or piping) ``y`` runs the folder's code. Every front-end load passes
  ``trust_remote_code=False`` (:data:`NO_REMOTE_CODE`) and a local folder that needs its own code is refused
  before transformers reads it (:func:`refuse_custom_code`), with a :class:`CustomCodeError`.
* **No silently random weights.** A checkpoint that lacks some of the model's tensors loads with those
  tensors freshly initialised (transformers only logs "newly initialized"); :func:`refuse_missing_weights`
  refuses it with a :class:`MissingWeightsError` naming them. Tensors transformers knows are legitimately
  not stored (tied weights such as an ``lm_head`` tied to the input embeddings, ``_keys_to_ignore_on_load_missing``)
  are not reported missing by transformers, and a reported tensor that shares its storage with a loaded one
  (tied) is accepted too.

Nothing here imports transformers at import time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from ..io.errors import ModelLoadError, one_line

__all__ = ["NO_REMOTE_CODE", "CustomCodeError", "MissingWeightsError", "refuse_custom_code", "custom_code_error",
           "refuse_missing_weights"]

#: Keyword arguments of every ``from_pretrained``/``from_config`` call of the front ends.
NO_REMOTE_CODE: dict[str, Any] = {"trust_remote_code": False}

# Most missing tensors named in a message (the rest are counted).
_MAX_NAMED = 8


class CustomCodeError(ModelLoadError, ValueError):
    """A model folder or repository needs its own Python code to load, which legrad never runs."""


class MissingWeightsError(ModelLoadError, ValueError):
    """A checkpoint lacks tensors of its model: loading it would give them random values."""


def _advice(name: str) -> str:
    return (f"legrad never runs code shipped with a model (trust_remote_code=False), whatever is typed on the "
            f"terminal; use a model type transformers supports, or build the model yourself (after reading its "
            f"code) and pass it to legrad.LeWrapper instead of {name}")


def refuse_custom_code(path: str, name: str) -> None:
    """Refuses a local model folder whose ``config.json`` needs the folder's own code to load.

    That is an ``auto_map`` naming an ``AutoConfig`` class while transformers does not know the
    ``model_type``: exactly the case where transformers would ask whether to run the folder's code.
    A folder whose ``auto_map`` sits next to a known ``model_type`` loads with transformers' own classes
    (and ``trust_remote_code=False``), so it is not refused here.

    Args:
        path: the folder (a non-folder, e.g. a Hub id, is left to ``trust_remote_code=False``).
        name: how the user named the model (``hf:DIR``), for the message.

    Raises:
        CustomCodeError: naming the folder and saying its code is not run.
    """
    if not os.path.isdir(path):
        return
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return  # no readable config: transformers' own error says so
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not isinstance(auto_map, dict) or "AutoConfig" not in auto_map:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return
    import transformers

    raise CustomCodeError(
        f"{name}: the model folder {os.path.abspath(path)} needs its own Python code to load (config.json's "
        f"auto_map names {auto_map['AutoConfig']!r} for model_type {model_type!r}, which transformers "
        f"{transformers.__version__} does not know); its code is not run: {_advice(name)}"
    )


def custom_code_error(exc: BaseException, name: str) -> CustomCodeError | None:
    """The :class:`CustomCodeError` for transformers' refusal of custom code (raised because of
    ``trust_remote_code=False``, e.g. by a processor's ``auto_map``), else None."""
    if isinstance(exc, ValueError) and "trust_remote_code" in str(exc):
        return CustomCodeError(f"{name} needs custom code to load ({one_line(exc, 160)}); its code is not run: "
                               f"{_advice(name)}")
    return None


def _tied(model: Any, missing: set[str]) -> set[str]:
    """Reported-missing tensors that share storage with a tensor that was loaded (tied weights)."""
    named = {**dict(model.named_parameters(remove_duplicate=False)),
             **dict(model.named_buffers(remove_duplicate=False))}
    loaded = {}
    for key, tensor in named.items():
        if key not in missing and tensor.device.type != "meta":
            loaded.setdefault((tensor.data_ptr(), tuple(tensor.shape)), key)
    return {key for key in missing if key in named and named[key].device.type != "meta"
            and (named[key].data_ptr(), tuple(named[key].shape)) in loaded}


def refuse_missing_weights(model: Any, info: dict[str, Iterable[str]], name: str, where: str, hint: str = "") -> None:
    """Refuses a model whose checkpoint lacked some of its tensors (transformers initialised them at random).

    Args:
        model: the loaded model.
        info: ``from_pretrained(..., output_loading_info=True)``'s second result (``missing_keys``,
            ``mismatched_keys``).
        name: how the user named the model (``hf:DIR``), for the message.
        where: the folder or repository the weights came from, for the message.
        hint: the end of the message (another way out, e.g. ``", or use --pretrained none ..."``).

    Raises:
        MissingWeightsError: naming the missing (or wrongly shaped) tensors.
    """
    missing = set(info.get("missing_keys") or ())
    missing -= _tied(model, missing)
    mismatched = {k[0] if isinstance(k, (tuple, list)) else k for k in info.get("mismatched_keys") or ()}
    bad = sorted(missing | mismatched)
    if not bad:
        return
    listed = ", ".join(bad[:_MAX_NAMED]) + (f" and {len(bad) - _MAX_NAMED} more" if len(bad) > _MAX_NAMED else "")
    raise MissingWeightsError(
        f"{name}: the checkpoint in {where} lacks {len(bad)} tensor(s) of the model ({listed}); loading it would "
        f"give them random values and meaningless heatmaps and scores; save the complete model there "
        f"(save_pretrained){hint}"
    )
