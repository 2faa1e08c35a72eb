"""The demo app's request for a local VLM the operator passed (``--model hf:DIR``): the question on the first
line, then one candidate answer per line; the question alone explains the model's own answer, token by token."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..engine.deadline import deadline
from ..frontend.vlm import strip_prefix
from ..viz import fit_for_display, overlay
from .settings import (
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_PROMPTS,
    MAX_PROMPTS_TEXT,
    parse_alpha,
    parse_layer,
)

if TYPE_CHECKING:
    from .requests import DemoApp

__all__ = ["predict_vlm"]


def predict_vlm(app: DemoApp, image: Any, image_source: str | None, text: str | None, name: str, alpha: float = 0.6,
                size_text: str | None = "", layer_index: Any = None) -> tuple[list[tuple[Any, str]], str]:
    """One overlay per candidate answer, captioned with its log-probability; for a question alone, the model's own
    greedy answer (at most :data:`~legrad.app.settings.MAX_NEW_TOKENS` tokens): the whole answer's overlay, then
    one per token. Returns ``(gallery, status)`` like :meth:`legrad.app.requests.DemoApp.predict`.

    Args:
        app: the app whose settings (time limit, image sources) and loaded VLM serve the request.
        image, image_source: the visitor's image (see :meth:`~legrad.app.requests.DemoApp.read_visitor_image`).
        text: the question on the first line, then one candidate answer per line (none: the model answers).
        name: the operator's ``hf:DIR`` entry.
        alpha: overlay opacity.
        size_text: must be blank (the VLM's processor sizes the image).
        layer_index: first explained block; None for the model's recommended one.

    Raises:
        ValueError, ImageLoadError, ModelLoadError: bad input or a model that cannot be loaded (the caller turns
            them into a status line).
    """
    if text is not None and len(text) > MAX_PROMPTS_TEXT:
        raise ValueError(f"the text is too long (at most {MAX_PROMPTS_TEXT} characters in all)")
    lines = [" ".join(ln.split()) for ln in (text or "").splitlines() if ln.strip()]
    if not lines:
        raise ValueError("enter the question on the first line, then one candidate answer per line (or the question "
                         "alone to explain the model's own answer)")
    question, answers = lines[0], lines[1:]
    if len(answers) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} answers at once, got {len(answers)}")
    if any(len(s) > MAX_PROMPT_CHARS for s in lines):
        raise ValueError(f"each line must be at most {MAX_PROMPT_CHARS} characters")
    alpha = parse_alpha(alpha)
    if size_text is not None and str(size_text).strip():
        raise ValueError("the image size does not apply to a VLM (its processor sizes the image); leave it blank")
    layer = parse_layer(layer_index)
    explainer = app.vlm_explainer(name)
    if not answers:
        return _own_answer(app, explainer, image, image_source, question, name, alpha, layer)
    with deadline(app.settings.time_limit):  # the operator's --time-limit, as for the other models
        picture = app.read_visitor_image(image, image_source)
        maps, logp = explainer.explain(picture, question, answers, layer_index=layer)
    shown = fit_for_display(picture)
    gallery = [(overlay(shown, maps[p], alpha=alpha), f"{a}: log-prob {logp[p]:.3f}") for p, a in enumerate(answers)]
    best = answers[int(logp.argmax())]
    return gallery, f"{strip_prefix(name)}: *{question}* most likely answer *{best}*."


def _own_answer(app: DemoApp, explainer: Any, image: Any, image_source: str | None, question: str, name: str,
                alpha: float, layer: int | None) -> tuple[list[tuple[Any, str]], str]:
    """The model's own answer to ``question``: the whole answer's overlay, then one per token."""
    with deadline(app.settings.time_limit):  # generating and explaining both count against --time-limit
        picture = app.read_visitor_image(image, image_source)
        r = explainer.explain_answer(picture, question, MAX_NEW_TOKENS, layer_index=layer)
    shown = fit_for_display(picture)
    tokens, logp, total = r.tokens[0], r.logprobs[0].tolist(), float(r.answer_logprob[0])
    gallery = [(overlay(shown, r.answer_map[0].numpy(), alpha=alpha), f"whole answer: log-prob {total:.3f}")]
    gallery += [(overlay(shown, r.maps[0][t].numpy(), alpha=alpha), f"{t + 1}. {tok!r}: log-prob {lp:.3f}")
                for t, (tok, lp) in enumerate(zip(tokens, logp))]
    return gallery, (f"{strip_prefix(name)}: *{question}* the model's answer (greedy, at most {MAX_NEW_TOKENS} tokens): "
                     f"*{r.text[0]}*; each map explains one token's log-probability.")
