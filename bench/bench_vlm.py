"""Cost of LeGrad for a VLM's answers, per family, against one plain forward and against its floor.

For every VLM family legrad supports (``legrad.adapters.vlm.SUPPORTED_VLM_CLASSES``), with its builder in
:data:`vlm_builders.FAMILIES` (one entry per family; tests/test_bench_vlm.py requires one for each),
builds a random-init model offline from a config and times, in the same process, interleaved in rounds after
one warm-up round, with medians over the rounds:

* *forward*: one no-grad ``model(**inputs_with_answers)`` on the B x P sequences prompt + answer (the answers
  appended, what scoring them with the model costs; full-vocabulary logits at every position, as the model
  computes them);
* *tower*: one no-grad ``model.get_image_features(...)`` of the image (the vision tower and projector);
* *LM fwd+bwd*: one forward of the language model alone on the same sequences (image features as input
  embeddings, logits at the answer positions only) and one backward to its inputs: what one explained block
  costs at least, since LeGrad scores the answers once per explained block, through the language model, and
  backpropagates;
* *LeGrad*: one ``compute_legrad(image=inputs, answers=[...])`` (the default ``layer_index``, k explained
  blocks);
* *explain_answer* (``--explain-answer N``): one ``wrapper.explain_answer(inputs, max_new_tokens=N)`` (greedy
  ``generate``, then per-token and whole-answer maps).

Ratios: LeGrad / forward, and LeGrad / floor where floor = tower + k x (LM fwd+bwd) (the tower runs once). Extra peak memory of the forward
and of LeGrad above the loaded model: peak RSS of each call (CUDA allocator peak on GPU), measured once each in
one fresh process per row (the forward first, then LeGrad), and their ratio.

Sizes: ``tiny`` (toy widths, a few blocks; seconds) and ``real``: the real widths, heads, MLP sizes and
vocabulary of a 7B-class checkpoint with only ``--lm-layers`` language-model layers (default 2; the ratio to
the floor does not depend on it, and the full models do not fit a small CPU machine). ``real`` keeps each vision
tower at its real depth and at the resolution given in :data:`FAMILIES`.

    python bench/bench_vlm.py --sizes tiny --threads 1
    python bench/bench_vlm.py --families llava qwen2-vl --sizes real --dtype bfloat16 --threads 1 --reps 2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from common import peak_extra_bytes, sync, time_rounds
from vlm_builders import FAMILIES, Built, Family, _llava  # noqa: F401  (_llava: the tests' stand-in family)

PROMPT_WORDS = 20  # words of the question after the image
ANSWER_TOKENS = 3


def families() -> list[tuple[str, Family | None, bool]]:
    """``(class name, its Family or None, supported by legrad)`` for every supported or benchmarkable family."""
    from legrad.adapters.vlm import SUPPORTED_VLM_CLASSES

    names = list(SUPPORTED_VLM_CLASSES) + [c for c in FAMILIES if c not in SUPPORTED_VLM_CLASSES]
    return [(c, FAMILIES.get(c), c in SUPPORTED_VLM_CLASSES) for c in names]


@dataclass
class Case:
    """A built model with its call: the processor-like ``inputs`` (one image, a prompt of
    :data:`PROMPT_WORDS` words), the ``answers``, and ``plain``: the model's own inputs for every prompt + answer
    sequence."""

    built: Built
    inputs: dict[str, torch.Tensor]
    answers: list[torch.Tensor]
    plain: dict[str, torch.Tensor]


def make_case(built: Built, answers: int) -> Case:
    """The call on ``built``: the image placeholder expanded to the model's own feature count."""
    model = built.model
    with torch.no_grad():
        feats = model.get_image_features(**built.pixels)
    feats = getattr(feats, "pooler_output", feats)
    n_img = sum(f.reshape(-1, f.shape[-1]).shape[0] for f in feats) if isinstance(feats, (list, tuple)) else \
        feats.reshape(-1, feats.shape[-1]).shape[0]
    image_token = int(model.config.image_token_id)
    video = getattr(model.config, "video_token_id", None)
    top = min(500, min([image_token, *built.before, *built.after, *([] if video is None else [int(video)])]))
    g = torch.Generator().manual_seed(1)
    words = torch.randint(3, top, (PROMPT_WORDS,), generator=g)
    prompt = torch.cat([torch.tensor([1, *built.before]), torch.full((n_img,), image_token),
                        torch.tensor(built.after, dtype=torch.long), words])
    ans = [torch.randint(3, top, (ANSWER_TOKENS,), generator=g) for _ in range(answers)]
    inputs = {"input_ids": prompt[None], "attention_mask": torch.ones(1, len(prompt), dtype=torch.long),
              **built.pixels}
    full = torch.stack([torch.cat([prompt, a]) for a in ans])
    plain = {"input_ids": full, "attention_mask": torch.ones_like(full)}
    for key, value in built.pixels.items():  # one image per sequence (Qwen: the images' patches concatenated)
        plain[key] = torch.cat([value] * answers) if "image_grid_thw" in built.pixels else \
            value.repeat_interleave(answers, 0)
    if built.token_types is not None and built.types == "suffix":  # PaliGemma: the answer is the causal suffix
        inputs[built.token_types] = torch.zeros_like(inputs["input_ids"])
        plain[built.token_types] = (torch.arange(full.shape[1]) >= len(prompt)).long().expand_as(full).contiguous()
    elif built.token_types is not None:  # 1 at the image tokens (Qwen's mm_token_type_ids, Gemma 3's token types)
        inputs[built.token_types] = (inputs["input_ids"] == image_token).long()
        plain[built.token_types] = (full == image_token).long()
    return Case(built, inputs, ans, plain)


def to_device(d: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in d.items()}


def calls(case: Case, device: str, explain_tokens: int) -> tuple[dict[str, Callable[[], Any]], int]:
    """The timed calls of a case, and k (the explained blocks of the default ``layer_index``)."""
    from legrad import LeWrapper

    model = case.built.model
    wrapper = LeWrapper(model, tokenizer=_IdTokenizer())
    k = len(range(wrapper.adapter.depth)[wrapper.layer_index:])
    inputs, plain = to_device(case.inputs, device), to_device(case.plain, device)
    ids = plain["input_ids"]
    image_token = int(model.config.image_token_id)
    lm = getattr(model.model, "language_model", None) or model.model.text_model  # Idefics3 / SmolVLM: text_model
    head = model.get_output_embeddings()
    target = ids[:, -ANSWER_TOKENS:]

    def forward() -> None:
        with torch.no_grad():
            model(**plain)

    pixels = to_device(case.built.pixels, device)

    def tower() -> None:
        with torch.no_grad():
            model.get_image_features(**pixels)

    def lm_fwd_bwd() -> None:
        # The floor of one explained block: the language model on the same sequences, inputs requiring grad
        # (where the image features enter), logits at the answer positions only, one backward to the inputs.
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(torch.where(ids == image_token, 0, ids)).detach()
            embeds.requires_grad_(True)
            hidden = lm(inputs_embeds=embeds, attention_mask=plain["attention_mask"], use_cache=False)[0]
            logits = head(hidden[:, -ANSWER_TOKENS - 1:-1]).float()
            score = logits.log_softmax(-1).gather(-1, target[..., None]).sum()
            torch.autograd.grad(score, embeds)

    def legrad() -> None:
        wrapper.compute_legrad(image=inputs, answers=case.answers)

    out = {"forward": forward, "tower": tower, "lm_fwd_bwd": lm_fwd_bwd, "legrad": legrad}
    if explain_tokens:
        def explain_answer() -> None:
            wrapper.explain_answer(inputs, max_new_tokens=explain_tokens, min_new_tokens=explain_tokens,
                                          suppress_tokens=[image_token])

        out["explain_answer"] = explain_answer
    return out, k


class _IdTokenizer:
    """Decodes ids to their numbers (explain_answer decodes its tokens; the bench has no vocabulary)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(str(i) for i in ids)


def build_case(args: argparse.Namespace, family: Family, size: str) -> Case:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    built = family.build(size, args.lm_layers, getattr(torch, args.dtype))
    built.model.to(args.device)
    return make_case(built, args.answers)


def memory_child(args: argparse.Namespace) -> None:
    """``--_memory-child CLASS SIZE``: in this fresh process, the extra peak of one forward, then of one LeGrad
    call (JSON on stdout)."""
    cls_name, size = args._memory_child
    case = build_case(args, FAMILIES[cls_name], size)
    fns, _ = calls(case, args.device, 0)
    sync(args.device)
    print(json.dumps({name: peak_extra_bytes(fns[name], args.device) for name in ("forward", "legrad")}))


def child_mib(args: argparse.Namespace, cls_name: str, size: str) -> dict[str, float]:
    """The memory child's extra peaks, in MiB."""
    cmd = [sys.executable, __file__, "--_memory-child", cls_name, size, "--lm-layers", str(args.lm_layers),
           "--dtype", args.dtype, "--answers", str(args.answers), "--device", args.device,
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return {k: v / 2**20 for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def _ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """The median over rounds of ``num / den``."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def row(args: argparse.Namespace, cls_name: str, family: Family, size: str) -> str:
    """One table row (markdown) of a family at a size."""
    case = build_case(args, family, size)
    fns, k = calls(case, args.device, args.explain_answer)
    times = time_rounds(fns, args.reps, args.device)
    times["floor"] = [t + k * lm for t, lm in zip(times["tower"], times["lm_fwd_bwd"])]
    med = {name: statistics.median(t) for name, t in times.items()}
    vs_forward, vs_floor = _ratio(times, "legrad", "forward"), _ratio(times, "legrad", "floor")
    answer = "-"
    if "explain_answer" in med:
        answer = f"{med['explain_answer']:.3f} ({_ratio(times, 'explain_answer', 'forward'):.1f}x)"
    mem = "- | - | -"
    if args.memory:
        peak = child_mib(args, cls_name, size)
        mem = f"{peak['forward']:,.0f} | {peak['legrad']:,.0f} | {peak['legrad'] / max(peak['forward'], 1.0):.1f}x"
    seq = case.plain["input_ids"].shape
    return (f"| {family.name} | {size}: {case.built.shape} | {args.lm_layers} | {args.dtype} | {seq[0]} x {seq[1]} "
            f"| {k} | {med['forward']:.3f} | {med['tower']:.3f} | {med['lm_fwd_bwd']:.3f} | {med['legrad']:.3f} "
            f"| **{vs_forward:.2f}x** "
            f"| **{vs_floor:.2f}x** | {answer} | {mem} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=None,
                        help="short names (llava, qwen2-vl, ...); default: every family")
    parser.add_argument("--sizes", nargs="+", choices=["tiny", "real"], default=["tiny"])
    parser.add_argument("--lm-layers", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--answers", type=int, default=2, help="P answers of 3 tokens (B = 1 image)")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds after the warm-up round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--explain-answer", type=int, default=0, metavar="N",
                        help="also time explain_answer with N new tokens")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory subprocesses")
    parser.add_argument("--_memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args._memory_child:
        memory_child(args)
        return
    print(f"threads={torch.get_num_threads()} device={args.device} torch={torch.__version__} "
          f"B=1 P={args.answers} answers of {ANSWER_TOKENS} tokens, prompt of {PROMPT_WORDS} words + the image")
    print("| family | size | LM layers | dtype | sequences | k | forward (s) | tower (s) | LM fwd+bwd (s) "
          "| LeGrad (s) | LeGrad / forward | LeGrad / floor | explain_answer (s) | forward peak (MiB) "
          "| LeGrad peak (MiB) | peak ratio |")
    print("|" + "---|" * 16)
    for cls_name, family, supported in families():
        name = cls_name if family is None else family.name
        if args.families is not None and name not in args.families:
            continue
        if family is None or not supported:
            why = "no builder in bench/vlm_builders.py" if family is None else "no legrad adapter in this checkout"
            print(f"| {name} | not benchmarked: {why} |" + " |" * 14)
            continue
        for size in args.sizes:
            try:
                print(row(args, cls_name, family, size), flush=True)
            except NotImplementedError as exc:
                print(f"| {family.name} | {size}: not benchmarked: {exc} |" + " |" * 14, flush=True)


if __name__ == "__main__":
    main()
