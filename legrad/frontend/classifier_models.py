"""Loading ViT image classifiers by name for the front ends: ``timm:``, ``torchvision:`` and ``hf:`` models.

:func:`legrad.frontend.models.load_model` sends names with one of these prefixes here:

* ``timm:ARCH[.TAG]`` -- ``timm.create_model``; ``pretrained``: None (the name's tag, else timm's
  default tag), a tag, a local checkpoint file, or ``'none'`` (random init).
* ``torchvision:NAME`` -- ``torchvision.models.get_model``; ``pretrained``: None (``DEFAULT``
  weights), a weights tag (``IMAGENET1K_V1``), a local state-dict file, or ``'none'``.
* ``hf:REPO_OR_DIR`` -- transformers ``AutoModelForImageClassification.from_pretrained`` of a Hub id
  or a local directory; ``pretrained='none'`` builds the config's model with random weights. Code shipped
  with the model is never run (``trust_remote_code=False``) and a checkpoint lacking some of the model's
  tensors is refused instead of loading them at random (:mod:`legrad.frontend.hf_checks`).

Random weights (``'none'``) are drawn from a fixed seed: the same random model in every run.

Each gives ``(model, preprocess, labels)``: the model in eval mode, a torchvision ``Compose`` built
from the model's own data config (PIL -> ``[3, H, W]``), and :class:`ClassLabels`, which turns
targets given as class indices or class names (from the model's metadata) into indices.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ..adapters.registry import tower_adapter_for
from ..engine.targets import Logits
from ..io.errors import ModelLoadError, one_line
from .downloads import check_download_reachable, hub_cached, weights_cached
from .hf_checks import NO_REMOTE_CODE, custom_code_error, refuse_custom_code, refuse_missing_weights

__all__ = ["CLASSIFIER_PREFIXES", "ClassLabels", "is_classifier_name", "load_classifier"]

logger = logging.getLogger(__name__)

#: Model-name prefixes of the classifier libraries.
CLASSIFIER_PREFIXES = ("timm:", "torchvision:", "hf:")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NO_WEIGHTS = {"none", "random", ""}
#: Longest target name accepted, and most targets per request (each costs one backward column).
MAX_TARGET_CHARS = 200
MAX_TARGETS = 64


def is_classifier_name(name: str | None) -> bool:
    """Whether a model name selects an image classifier (``timm:``, ``torchvision:`` or ``hf:`` prefix)."""
    return isinstance(name, str) and name.strip().lower().startswith(CLASSIFIER_PREFIXES)


def _norm(text: str) -> str:
    return " ".join(text.replace("_", " ").lower().split())


class ClassLabels:
    """Class names of a classifier, and the resolution of targets given as indices or names.

    A name matches a class by its full label (``'tabby, tabby cat'``) or by any of its comma-separated
    synonyms (``'tabby'``, ``'tabby cat'``), ignoring case, underscores and extra spaces. Digits are class
    indices. Calling the object on a list of targets gives their indices as a LongTensor ``[P]`` (it
    takes the tokenizer's place in ``load_model``'s result).

    Args:
        num_classes: number of classes of the model.
        names: one label per class, or None when the model has no class names.
    """

    def __init__(self, num_classes: int, names: Sequence[str] | None = None):
        if names is not None and len(names) != num_classes:
            logger.warning("the model has %d classes but its metadata names %d; class names disabled",
                           num_classes, len(names))
            names = None
        self.num_classes = int(num_classes)
        self.names = None if names is None else tuple(str(n) for n in names)
        self._full: dict[str, list[int]] = {}
        self._synonyms: dict[str, list[int]] = {}
        for i, name in enumerate(self.names or ()):
            self._full.setdefault(_norm(name), []).append(i)
            for syn in {_norm(s) for s in name.split(",") if s.strip()}:
                self._synonyms.setdefault(syn, []).append(i)

    def label(self, index: int) -> str:
        """A short display label: ``'tabby (281)'``, or ``'class 281'`` without names."""
        if self.names is None:
            return f"class {index}"
        return f"{self.names[index].split(',')[0].strip() or self.names[index]} ({index})"

    def resolve_one(self, target: int | str) -> int:
        """The class index of one target (an int, digits, or a class name).

        Raises:
            TypeError: for a target that is neither an int nor a string.
            ValueError: for an index out of range, an unknown name (with the closest class names) or a
                name shared by several classes (listing them).
        """
        if isinstance(target, bool) or not isinstance(target, (int, str)):
            raise TypeError(f"a class target must be an int or a class name, got {type(target).__name__}")
        if isinstance(target, str):
            text = " ".join(target.split())
            if len(text) > MAX_TARGET_CHARS:
                raise ValueError(f"class name too long ({len(text)} characters, at most {MAX_TARGET_CHARS})")
            if re.fullmatch(r"[+-]?\d{1,9}", text):
                target = int(text)
        if isinstance(target, int):
            if not 0 <= target < self.num_classes:
                raise ValueError(f"class {target} is out of range: this model has {self.num_classes} classes "
                                 f"(0..{self.num_classes - 1})")
            return target
        key = _norm(text)
        if not key:
            raise ValueError("empty class target; give a class index or name")
        if self.names is None:
            raise ValueError(f"this model has no class names; give class indices (0..{self.num_classes - 1}) "
                             f"instead of {text!r}")
        found = self._full.get(key) or self._synonyms.get(key, [])
        if len(found) == 1:
            return found[0]
        if found:
            listed = ", ".join(f"{i} ({self.names[i]})" for i in found[:8])
            raise ValueError(f"class name {text!r} is ambiguous: it names classes {listed}; give the index")
        close = difflib.get_close_matches(key, list(self._synonyms), n=5, cutoff=0.6)
        hint = ("; close matches: " + ", ".join(f"{c!r} ({self._synonyms[c][0]})" for c in close)) if close else ""
        raise ValueError(f"unknown class name {text!r} for this model{hint}; or give a class index "
                         f"(0..{self.num_classes - 1})")

    def resolve(self, targets: Sequence[int | str] | int | str) -> list[int]:
        """Class indices of several targets, in order (duplicates kept).

        Raises:
            TypeError, ValueError: see :meth:`resolve_one`; also for no target or more than ``MAX_TARGETS``.
        """
        if isinstance(targets, (int, str)):
            targets = [targets]
        targets = [t for t in targets if not (isinstance(t, str) and not t.strip())]
        if not targets:
            raise ValueError("give at least one class target: a class index or a class name, e.g. 281 or tabby")
        if len(targets) > MAX_TARGETS:
            raise ValueError(f"too many class targets ({len(targets)}, at most {MAX_TARGETS})")
        return [self.resolve_one(t) for t in targets]

    def __call__(self, targets: Sequence[int | str] | int | str) -> torch.Tensor:
        """``[P]`` LongTensor of class indices; see :meth:`resolve`."""
        return torch.tensor(self.resolve(targets), dtype=torch.long)

    def __repr__(self) -> str:
        return f"ClassLabels(num_classes={self.num_classes}, names={'yes' if self.names else 'no'})"


# ------------------------------------------------------------------------------------------- helpers
def _error(msg: str) -> ModelLoadError:
    return ModelLoadError(msg)


def _no_weights(pretrained: str | None) -> bool:
    return pretrained is not None and pretrained.strip().lower() in _NO_WEIGHTS


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))


def _check_supported(model: torch.nn.Module, name: str) -> None:
    try:
        adapter = tower_adapter_for(model)
    except TypeError as exc:
        raise _error(f"{name} is not a ViT classifier LeGrad supports ({one_line(exc, 160)})") from exc
    if not isinstance(adapter.readout_space, Logits):
        raise _error(f"{name} is not an image classifier")


def _compose(resize: Any, crop: tuple[int, int] | None, interpolation: InterpolationMode,
             mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    steps: list[Any] = [T.Resize(resize, interpolation=interpolation, antialias=True)]
    if crop is not None:
        steps.append(T.CenterCrop(crop))
    steps += [T.Lambda(_to_rgb), T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]
    return T.Compose(steps)


def _to_rgb(image: Any) -> Any:
    return image.convert("RGB")


def _interpolation(value: Any) -> InterpolationMode:
    if isinstance(value, InterpolationMode):
        return value
    if isinstance(value, int):  # PIL resample codes (Hugging Face processors)
        return {0: InterpolationMode.NEAREST, 2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC,
                1: InterpolationMode.LANCZOS}.get(value, InterpolationMode.BILINEAR)
    try:
        return InterpolationMode(str(value).lower())
    except ValueError:
        return InterpolationMode.BICUBIC


# ---------------------------------------------------------------------------------------------- timm
def _load_timm(spec: str, pretrained: str | None, device: str) -> tuple[Any, T.Compose, ClassLabels]:
    import timm

    arch, _, tag = spec.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise _error(f"unknown timm model {arch!r}{hint}; see timm.list_models()")
    with torch.device("meta"):
        _check_supported(timm.create_model(arch, pretrained=False), f"timm:{arch}")
    kwargs: dict[str, Any] = {}
    full = spec
    if _no_weights(pretrained):
        load = False
    elif pretrained is not None and os.path.isfile(pretrained):
        load, kwargs["pretrained_cfg_overlay"] = True, {"file": pretrained}
    elif pretrained is not None and _looks_like_path(pretrained):
        raise _error(f"checkpoint file {pretrained!r} not found")
    else:
        load = True
        if pretrained is not None:
            if tag and tag != pretrained:
                raise _error(f"timm:{spec} already names the tag {tag!r}; drop --pretrained {pretrained!r}")
            full = f"{arch}.{pretrained}"
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        want = full.partition(".")[2]
        if want and want not in tags:
            raise _error(f"unknown pretrained tag {want!r} for timm:{arch} (known: {', '.join(tags) or 'none'})")
        if not tags:
            raise _error(f"timm has no pretrained weights for {arch}; use --pretrained none or a checkpoint file")
        _timm_fail_fast(full)
    if not load:
        logger.warning("timm:%s has random weights: its heatmaps and logits are meaningless", spec)
    try:
        model = timm.create_model(full, pretrained=load, **kwargs)
    except Exception as exc:
        if "pretrained_cfg_overlay" in kwargs:
            raise _error(f"could not load checkpoint {pretrained!r} into timm:{arch}: {one_line(exc, 200)}") from exc
        raise _error(f"could not download the weights of timm:{full} ({one_line(exc, 160)}); check the "
                     "internet connection, or give a checkpoint file (--pretrained PATH)") from exc
    model = model.to(device).eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    size = tuple(int(s) for s in cfg["input_size"][-2:])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    resize = int(size[0] / crop_pct) if size[0] == size[1] else tuple(int(s / crop_pct) for s in size)
    preprocess = _compose(resize, size, _interpolation(cfg.get("interpolation", "bicubic")), cfg["mean"], cfg["std"])
    return model, preprocess, ClassLabels(model.num_classes, _timm_names(model))


def _timm_names(model: Any) -> list[str] | None:
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset
    except ImportError:
        return None
    try:
        subset = infer_imagenet_subset(model)
        if not subset:
            return None
        info = ImageNetInfo(subset)
        return [info.index_to_description(i) for i in range(info.num_classes())]
    except Exception as exc:  # metadata is a convenience: never fail the load for it
        logger.info("no class names for this timm model (%s)", one_line(exc, 80))
        return None


def _timm_fail_fast(full: str) -> None:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(full)
    if cfg is None:
        return
    hub = getattr(cfg, "hf_hub_id", None) or ""
    url = getattr(cfg, "url", None) or ""
    if hub:
        if hub_cached(hub, ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")):
            return
        check_download_reachable(None, f"weights of timm:{full}")
    elif url:
        if weights_cached({"url": url}) or os.path.isfile(_torch_hub_file(url)):
            return
        check_download_reachable(url, f"weights of timm:{full}")


def _torch_hub_file(url: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url.split("?", 1)[0]))


# -------------------------------------------------------------------------------------- torchvision
def _load_torchvision(spec: str, pretrained: str | None, device: str) -> tuple[Any, T.Compose, ClassLabels]:
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    if spec not in names:
        close = difflib.get_close_matches(spec, names, n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise _error(f"unknown torchvision model {spec!r}{hint}; see torchvision.models.list_models()")
    with torch.device("meta"):
        _check_supported(tvm.get_model(spec, weights=None), f"torchvision:{spec}")
    enum = tvm.get_model_weights(spec)
    weights = None
    path = None
    if _no_weights(pretrained):
        pass
    elif pretrained is not None and os.path.isfile(pretrained):
        path = pretrained
    elif pretrained is not None and _looks_like_path(pretrained):
        raise _error(f"checkpoint file {pretrained!r} not found")
    else:
        tag = (pretrained or "DEFAULT").split(".")[-1]
        try:
            weights = enum[tag] if tag != "DEFAULT" else enum.DEFAULT
        except KeyError:
            known = ", ".join(w.name for w in enum)
            raise _error(f"unknown weights {pretrained!r} for torchvision:{spec} (known: DEFAULT, {known})") from None
        if not os.path.isfile(_torch_hub_file(weights.url)):
            check_download_reachable(weights.url, f"weights of torchvision:{spec}")
    if weights is None and path is None:
        logger.warning("torchvision:%s has random weights: its heatmaps and logits are meaningless", spec)
    try:
        model = tvm.get_model(spec, weights=weights)
        if path is not None:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    except Exception as exc:
        if path is not None:
            raise _error(f"could not load checkpoint {path!r} into torchvision:{spec}: {one_line(exc, 200)}") from exc
        raise _error(f"could not download the weights of torchvision:{spec} ({one_line(exc, 160)}); check the "
                     "internet connection, or give a state-dict file (--pretrained PATH)") from exc
    model = model.to(device).eval()
    size = int(getattr(model, "image_size", 224))
    meta_weights = weights or enum.DEFAULT  # a random model keeps the class layout of the weights' dataset
    preset = meta_weights.transforms()
    crop = int(preset.crop_size[0])
    if crop == size:
        preprocess = _compose(int(preset.resize_size[0]), (size, size), _interpolation(preset.interpolation),
                              preset.mean, preset.std)
    else:
        preprocess = _compose(int(round(size * 256 / 224)), (size, size), InterpolationMode.BILINEAR,
                              IMAGENET_MEAN, IMAGENET_STD)
    names = meta_weights.meta.get("categories")
    return model, preprocess, ClassLabels(_num_classes(model), names)


def _num_classes(model: Any) -> int:
    return int(tower_adapter_for(model).num_classes)


# ------------------------------------------------------------------------------------- Hugging Face
def _load_hf(spec: str, pretrained: str | None, device: str) -> tuple[Any, T.Compose, ClassLabels]:
    try:
        import transformers
    except ImportError as exc:
        raise _error("hf: models need transformers: pip install legrad_torch[hf]") from exc
    local = os.path.isdir(spec)
    if pretrained is not None and not _no_weights(pretrained):
        raise _error("for hf: models give the Hub id or local directory in the name (hf:DIR); --pretrained only "
                     "takes 'none' (random weights)")
    if not local:
        if _looks_like_path(spec) and (spec.startswith((".", os.sep, "~")) or spec.count("/") > 1):
            raise _error(f"model directory {spec!r} not found")
        env = {k.lower() for k, v in os.environ.items() if v}
        if not env & {"hf_hub_offline", "transformers_offline"} and not hub_cached(spec, ("config.json",)):
            check_download_reachable(None, f"Hugging Face model {spec}", "or --pretrained none for random weights",
                                     local="save the model and its image processor to a local directory "
                                           "(save_pretrained) and use --model hf:DIR")
    refuse_custom_code(spec, f"hf:{spec}")  # before transformers reads the folder (it would ask on the terminal)
    info = None
    try:
        config = transformers.AutoConfig.from_pretrained(spec, **NO_REMOTE_CODE)
        if _no_weights(pretrained):
            logger.warning("hf:%s has random weights: its heatmaps and logits are meaningless", spec)
            model = transformers.AutoModelForImageClassification.from_config(config, **NO_REMOTE_CODE)
        else:
            model, info = transformers.AutoModelForImageClassification.from_pretrained(
                spec, output_loading_info=True, **NO_REMOTE_CODE)
    except Exception as exc:
        refused = custom_code_error(exc, f"hf:{spec}")
        raise refused or _error(f"could not load hf:{spec} ({one_line(exc, 160)})") from exc
    if info is not None:
        refuse_missing_weights(model, info, f"hf:{spec}", spec,
                               ", or use --pretrained none for an explicitly random model")
    _check_supported(model, f"hf:{spec}")
    model = model.to(device).eval()
    preprocess = _hf_preprocess(transformers, spec, config)
    id2label = getattr(config, "id2label", None) or {}
    n = _num_classes(model)
    names = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(n)] if id2label else None
    return model, preprocess, ClassLabels(n, names)


def _hf_preprocess(transformers: Any, spec: str, config: Any) -> T.Compose:
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(spec, **NO_REMOTE_CODE)
    except Exception as exc:
        logger.warning("no image processor for hf:%s (%s); using ViT defaults", spec, one_line(exc, 80))
        size = int(getattr(config, "image_size", 224))
        return _compose((size, size), None, InterpolationMode.BILINEAR, (0.5,) * 3, (0.5,) * 3)
    size = getattr(proc, "size", None) or {}
    side = int(getattr(config, "image_size", 224))
    hw = (int(size.get("height", side)), int(size.get("width", side))) if isinstance(size, dict) else (side, side)
    mean = getattr(proc, "image_mean", None) or (0.5,) * 3
    std = getattr(proc, "image_std", None) or (0.5,) * 3
    if not getattr(proc, "do_normalize", True):
        mean, std = (0.0,) * 3, (1.0,) * 3
    return _compose(hw, None, _interpolation(getattr(proc, "resample", 2)), mean, std)


def load_classifier(name: str, pretrained: str | None, device: str) -> tuple[Any, T.Compose, ClassLabels]:
    """Loads a ``timm:`` / ``torchvision:`` / ``hf:`` classifier; see the module docstring.

    Returns:
        ``(model, preprocess, labels)``.

    Raises:
        ModelLoadError: unknown or unsupported model, unknown tag, weights that cannot be fetched.
    """
    prefix, _, spec = name.strip().partition(":")
    spec = spec.strip()
    if not spec:
        raise _error(f"give a model after {prefix}:, e.g. timm:vit_base_patch16_224")
    loader = {"timm": _load_timm, "torchvision": _load_torchvision, "hf": _load_hf}[prefix.lower()]
    # Random initialisation ('none') is seeded, so that a random model is the same in every front end and
    # run; the caller's global RNG state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, preprocess, labels = loader(spec, pretrained, device)
        if _no_weights(pretrained):
            _unzero_heads(model)
    return model, preprocess, labels


def _unzero_heads(model: torch.nn.Module) -> None:
    """Gives a random model's all-zero linear layers small random weights (normal, std 0.02).

    Some libraries start the classification head at zero (torchvision's ``VisionTransformer``): a random
    model would then give every class the logit 0 and every map would be flat. Its maps are meaningless
    either way (random weights); this only makes them visible, as the front ends promise a figure.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not bool(module.weight.any()):
                torch.nn.init.normal_(module.weight, std=0.02)
