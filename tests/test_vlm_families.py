"""The contract every VLM family keeps (one test over a table with one entry per family, like timm's
tests/test_models.py): a tiny random model and its REAL processor built offline (``save_pretrained`` /
``from_pretrained`` round trip), one image and one question; for each family

(a) the processor's whole output is accepted, and an unknown extra key is ignored;
(b) ``return_scores`` equals the model's own teacher-forced log-probabilities, from its forward on the processor's
    output for the question with the answer appended (PaliGemma: the answer as the processor's ``suffix``);
(c) the model is left bitwise intact and no hook is added;
(d) a vision block whose forward changed is refused at wrap with ``DriftError``;
(e) ``layer_index=0`` and the default give finite maps in [0, 1] of the documented size (the image the processor
    saw; any-resolution families: the image's own size), ``output_size="grid"`` the patch grid;
(f) ``explain_answer``'s tokens are ``generate``'s greedy new tokens.

A family cannot be added to ``SUPPORTED_VLM_CLASSES`` without its entry here; a family the installed transformers
lacks is skipped with the reason."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import qwen_vlm as Q  # noqa: E402
from helpers import vlm_families as F  # noqa: E402
from helpers import vlm_models as V  # noqa: E402
from helpers.tiny_towers import same_bits  # noqa: E402

from legrad import LeWrapper  # noqa: E402
from legrad.adapters.drift import DriftError  # noqa: E402
from legrad.adapters.vlm import SUPPORTED_VLM_CLASSES  # noqa: E402

ANSWERS = ["a cat", "two cats red"]
QWEN_TEXT = "<s> w60 <image> w61 what is in the picture ?"


def _anyres_grid(module: str) -> Callable[[Any], tuple[int, int]]:
    """The stitched tile grid of an any-resolution family, from the model's own functions: the tiles' patch grid
    cropped to the image's aspect (``unpad_image``)."""
    def grid(inputs: Any) -> tuple[int, int]:
        m = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        size = inputs["image_sizes"][0].tolist()
        rows, cols = m.get_anyres_image_grid_shape(size, F.PINS, 32)
        return tuple(m.unpad_image(torch.zeros(1, rows * V.GRID, cols * V.GRID), size).shape[1:])
    return grid


def _square(n: int) -> Callable[[Any], tuple[int, int]]:
    return lambda inputs: (n, n)


def _pixels_size(inputs: Any) -> tuple[int, int]:
    return tuple(inputs["pixel_values"].shape[-2:])


def _image_size(inputs: Any) -> tuple[int, int]:
    return tuple(inputs["image_sizes"][0].tolist())


def _pixtral_grid(inputs: Any) -> tuple[int, int]:
    return tuple(int(v) // F.MISTRAL3_PATCH for v in inputs["image_sizes"][0])


def _qwen_grid(inputs: Any) -> tuple[int, int]:
    return tuple(inputs["image_grid_thw"][0, 1:].tolist())


def _qwen_size(inputs: Any) -> tuple[int, int]:
    h, w = _qwen_grid(inputs)
    return h * 8, w * 8


@dataclass(frozen=True)
class Family:
    """One family's entry: how to build it and what its maps look like.

    Attributes:
        model_class: the transformers class (a key of ``SUPPORTED_VLM_CLASSES``).
        model: builds the tiny random model (eval mode).
        processor: builds the real processor in a folder (round trip).
        question: the prompt text, image token included where the family's processor needs it.
        grid: ``(gh, gw)`` of ``output_size="grid"`` from the processor output.
        map_size: ``(H, W)`` of the default maps from the processor output.
        call: further processor options (InternVL: one tile).
        suffix: the answer goes to the processor's ``suffix`` (PaliGemma's causal answer), not after the question.
        needs: a package the processor needs (skipped without it).
    """

    model_class: str
    model: Callable[[], torch.nn.Module]
    processor: Callable[[Any], Any]
    question: str
    grid: Callable[[Any], tuple[int, int]]
    map_size: Callable[[Any], tuple[int, int]] = _pixels_size
    call: dict[str, Any] = field(default_factory=dict)
    suffix: bool = False
    needs: str | None = None


def _qwen(cls: str, model: Callable, processor_class: str, video: str = "Qwen2VLVideoProcessor") -> Family:
    return Family(cls, model, lambda p: Q.qwen_processor(p, processor_class=processor_class,
                                                           video_processor_class=video),
                  QWEN_TEXT, _qwen_grid, _qwen_size)


FAMILIES: dict[str, Family] = {
    "llava": Family("LlavaForConditionalGeneration", V.llava, F.llava_processor,
                    "<image>\nwhat is in the picture ?", _square(V.GRID)),
    "llava_next": Family("LlavaNextForConditionalGeneration", V.llava_next, F.llava_next_processor,
                         "<image>\nwhat is in the picture ?", _anyres_grid("llava_next"), _image_size),
    "llava_onevision": Family("LlavaOnevisionForConditionalGeneration", F.onevision, F.onevision_processor,
                              "<image> what is in the picture ?", _anyres_grid("llava_onevision"), _image_size),
    "paligemma": Family("PaliGemmaForConditionalGeneration", V.paligemma, F.paligemma_processor,
                        "answer en what is in the picture ?", _square(V.GRID), suffix=True),
    "qwen2_vl": _qwen("Qwen2VLForConditionalGeneration", Q.qwen2_vl, "Qwen2VLProcessor"),
    "qwen2_5_vl": _qwen("Qwen2_5_VLForConditionalGeneration", Q.qwen2_5_vl, "Qwen2_5_VLProcessor"),
    "qwen3_5": _qwen("Qwen3_5ForConditionalGeneration", Q.qwen3_5, "Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    "qwen3_vl": _qwen("Qwen3VLForConditionalGeneration", Q.qwen3_vl, "Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    "internvl": Family("InternVLForConditionalGeneration", F.internvl, F.internvl_processor,
                       "<IMG_CONTEXT> what is in the picture ?", _square(F.INTERNVL_SIZE // F.INTERNVL_PATCH),
                       call=dict(crop_to_patches=False)),
    "gemma3": Family("Gemma3ForConditionalGeneration", F.gemma3, F.gemma3_processor,
                     "<s> <start_of_image> what is in the picture ?", _square(V.GRID)),
    "idefics3": Family("Idefics3ForConditionalGeneration", F.idefics3, lambda p: F.idefics3_processor("idefics3", p),
                       "<s> <image> what is in the picture ?", _square(V.GRID)),
    "smolvlm": Family("SmolVLMForConditionalGeneration", lambda: F.idefics3("smolvlm"),
                      lambda p: F.idefics3_processor("smolvlm", p), "<s> <image> what is in the picture ?",
                      _square(V.GRID), needs="num2words"),
    "mistral3": Family("Mistral3ForConditionalGeneration", F.mistral3, F.mistral3_processor,
                       "[IMG] what is in the picture ?", _pixtral_grid, _image_size),
}


def skip_if_missing(family: Family) -> None:
    """``pytest.skip`` with the reason when the installed transformers (or the processor's package) lacks it."""
    if getattr(transformers, family.model_class, None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no {family.model_class}")
    if family.needs and importlib.util.find_spec(family.needs) is None:
        pytest.skip(f"the {family.model_class} processor needs the {family.needs} package, not installed")


def _first_vision_block(model: torch.nn.Module) -> torch.nn.Module:
    """The first block of the model's vision tower (every family's layout)."""
    inner = model.model
    if hasattr(inner, "visual"):  # the Qwen line
        return inner.visual.blocks[0]
    if hasattr(getattr(inner, "vision_tower", None), "transformer"):  # Pixtral (Mistral 3)
        return inner.vision_tower.transformer.layers[0]
    tower = getattr(inner, "vision_model", None) or inner.vision_tower
    encoder = getattr(tower, "vision_model", tower).encoder
    return (encoder.layers if hasattr(encoder, "layers") else encoder.layer)[0]


def _ramp(out: Any) -> Any:
    """A block output times a channel ramp (norms downstream would hide a uniform scaling)."""
    if isinstance(out, tuple):
        return (_ramp(out[0]), *out[1:])
    return out * torch.linspace(0.9, 1.1, out.shape[-1], dtype=out.dtype)


def own_log_probs(model: torch.nn.Module, family: Family, processor: Any, img: Any, answer: str) -> torch.Tensor:
    """``[T]`` teacher-forced log-probs of ``answer``, from the model's own forward on the processor's output for
    the question with the answer appended (no legrad)."""
    prompt = processor(images=img, text=family.question, return_tensors="pt", **family.call)["input_ids"][0]
    if family.suffix:
        full = processor(images=img, text=family.question, suffix=answer, return_tensors="pt", **family.call)
    else:
        full = processor(images=img, text=f"{family.question} {answer}", return_tensors="pt", **family.call)
    ids = torch.tensor(processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
    k, t = len(prompt), len(ids)
    assert torch.equal(full["input_ids"][0, :k], prompt) and torch.equal(full["input_ids"][0, k:k + t], ids)
    with torch.no_grad():
        logits = model(**full).logits.float()
    return logits[0, k - 1:k - 1 + t].log_softmax(-1).gather(-1, ids[:, None])[:, 0]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_contract(name, tmp_path, monkeypatch):
    family = FAMILIES[name]
    skip_if_missing(family)
    model = family.model()
    processor = family.processor(tmp_path / name)
    img = F.image(0)
    inputs = processor(images=img, text=family.question, return_tensors="pt", **family.call)
    # (b) the model's own log-probs first: its first forward installs transformers' output-capturing hooks.
    own = torch.stack([own_log_probs(model, family, processor, img, a).sum() for a in ANSWERS])
    before, hooks = V.snapshot(model), V.hooks(model)

    w = LeWrapper(model, tokenizer=processor)
    grid, scores = w.compute_legrad(image=inputs, answers=ANSWERS, output_size="grid", return_scores=True)
    torch.testing.assert_close(scores[0], own, atol=1e-4, rtol=0)  # (b)
    # (a) the whole processor output, plus a key no processor gives: ignored.
    extra, extra_scores = w.compute_legrad(image={**inputs, "not_a_processor_key": torch.zeros(3)}, answers=ANSWERS,
                                           output_size="grid", return_scores=True)
    assert torch.equal(extra, grid) and torch.equal(extra_scores, scores)
    # (e) the patch grid, and maps of the documented size, finite, in [0, 1].
    assert grid.shape == (1, len(ANSWERS), *family.grid(inputs))
    for maps in (grid, w.compute_legrad(image=inputs, answers=ANSWERS),
                 w.compute_legrad(image=inputs, answers=ANSWERS, layer_index=0)):
        assert bool(torch.isfinite(maps).all()) and float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
        size = family.grid(inputs) if maps is grid else family.map_size(inputs)
        assert maps.shape == (1, len(ANSWERS), *size)
    # (f) the model's own greedy answer.
    r = w.explain_answer(inputs, max_new_tokens=3)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert r.token_ids[0].tolist() == out[0, inputs["input_ids"].shape[1]:].tolist()
    # (c) bitwise intact, no hook added.
    after = V.snapshot(model)
    assert before.keys() == after.keys() and all(same_bits(before[k], after[k]) for k in before)
    assert V.hooks(model) == hooks
    # (d) a changed vision block is refused at wrap.
    block = _first_vision_block(model)
    forward = type(block).forward
    monkeypatch.setattr(type(block), "forward", lambda self, *a, **k: _ramp(forward(self, *a, **k)))
    with pytest.raises(DriftError, match="differs from the model's own forward"):
        LeWrapper(model, tokenizer=processor)


def test_every_supported_class_has_a_contract_entry():
    assert sorted(f.model_class for f in FAMILIES.values()) == sorted(SUPPORTED_VLM_CLASSES)


def test_a_family_the_installed_transformers_lacks_is_skipped_with_its_reason(monkeypatch):
    family = FAMILIES["llava"]
    monkeypatch.setattr(transformers, family.model_class, None)
    with pytest.raises(pytest.skip.Exception, match=f"has no {family.model_class}"):
        skip_if_missing(family)
