"""Cost of LeGrad for a VLM's answers vs one plain forward of the VLM on the same sequences.

Builds a random-init ``LlavaForConditionalGeneration`` offline from a config and times, in the same
process and in interleaved pairs, (a) one no-grad ``model(**inputs)`` forward on the B * P sequences
prompt + answer (the answers appended, as when scoring them) and (b) one ``compute_legrad(image=inputs,
answers=...)`` call. Extra peak memory of (b) above the loaded model is measured in a fresh subprocess
(peak RSS on CPU, CUDA allocator peak on GPU).

Shapes: ``tiny`` (CLIP 4 blocks, 32 px, Llama 2 x 48 wide) and ``7b`` (LLaVA-1.5-7B: CLIP ViT-L/14 at 336
px, 24 blocks, feature layer -2; Llama 4096 wide, 32 heads, MLP 11008, vocabulary 32064), whose language
model keeps ``--lm-layers`` of its 32 layers (default 2: the full model does not fit a small CPU machine;
LeGrad's cost per language-model layer is a forward plus a backward, like the baseline's forward, so the
ratio moves little with the depth; run ``--lm-layers 32`` on a large machine).

    python bench/bench_vlm.py --shape tiny
    python bench/bench_vlm.py --shape 7b --dtype bfloat16 --threads 2 --reps 1
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
from common import child_extra_mib, peak_extra_bytes, report_extra_bytes, time_pairs


def build(shape: str, lm_layers: int, dtype: torch.dtype, device: str):
    """``(model, image size, image tokens)`` of a random-init LLaVA of that shape, in eval mode."""
    import transformers as T

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    if shape == "tiny":
        vc = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                image_size=32, patch_size=8)
        tc = T.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=lm_layers, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64, max_position_embeddings=512)
        image_token = 63
    else:
        vc = T.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                image_size=336, patch_size=14, hidden_act="quick_gelu")
        tc = T.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=lm_layers,
                           num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                           max_position_embeddings=4096)
        image_token = 32000
    cfg = T.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=image_token, vision_feature_layer=-2,
                        vision_feature_select_strategy="default")
    model = T.LlavaForConditionalGeneration(cfg).to(device=device, dtype=dtype).eval()
    n_img = (vc.image_size // vc.patch_size) ** 2
    return model, vc.image_size, n_img


def inputs_for(model, size: int, n_img: int, batch: int, answers: int, device: str, dtype: torch.dtype):
    """The processor-like inputs (a 20-token prompt around the image), the answers (3 tokens each), and the
    baseline's inputs: every prompt with every answer appended."""
    g = torch.Generator().manual_seed(1)
    image_token = model.config.image_token_id
    top = min(500, image_token)
    words = torch.randint(3, top, (batch, 20), generator=g)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, n_img), image_token), words], 1)
    pixels = torch.randn(batch, 3, size, size, generator=g).to(device=device, dtype=dtype)
    inputs = {"pixel_values": pixels, "input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    ans = [torch.randint(3, top, (3,), generator=g) for _ in range(answers)]
    full = torch.cat([torch.cat([ids[b], a])[None] for b in range(batch) for a in ans]).to(device)
    plain = {"pixel_values": pixels.repeat_interleave(answers, 0), "input_ids": full,
             "attention_mask": torch.ones_like(full)}
    return inputs, ans, plain


def _setup(args):
    dtype = getattr(torch, args.dtype)
    model, size, n_img = build(args.shape, args.lm_layers, dtype, args.device)
    inputs, ans, plain = inputs_for(model, size, n_img, args.batch, args.answers, args.device, dtype)
    return model, inputs, ans, plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "7b"], default="tiny")
    parser.add_argument("--lm-layers", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--answers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocess")
    parser.add_argument("--_memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from legrad import LeWrapper

    model, inputs, ans, plain = _setup(args)
    wrapper = LeWrapper(model)

    def explain():
        return wrapper.compute_legrad(image=inputs, answers=ans)

    if args._memory_child:
        report_extra_bytes(peak_extra_bytes(explain, args.device))
        return

    def forward():
        with torch.no_grad():
            model(**plain)

    row = time_pairs(forward, explain, args.reps, args.device)
    mem = "-"
    if not args.no_memory:
        child = [sys.executable, __file__, "--_memory-child", *[a for a in sys.argv[1:] if a != "--no-memory"]]
        mem = f"{child_extra_mib(child):,.0f}"
    print(f"shape={args.shape} lm_layers={args.lm_layers} dtype={args.dtype} B={args.batch} P={args.answers} "
          f"threads={torch.get_num_threads()} device={args.device} torch={torch.__version__}")
    print("| shape | LM layers | dtype | B x P | forward (s) | LeGrad (s) | ratio | extra peak memory (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.shape} | {args.lm_layers} | {args.dtype} | {args.batch} x {args.answers} | {row['forward_s']:.3f} "
          f"| {row['legrad_s']:.3f} | **{row['ratio']:.2f}x** | {mem} |")


if __name__ == "__main__":
    main()
