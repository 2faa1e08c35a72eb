"""Tiny random-init VLMs (LLaVA, PaliGemma) built offline from configs, a word-level tokenizer built from a
vocabulary, and the independent oracle of the VLM tests.

The oracle follows the definition of docs/vlm.md without legrad: the model's own vision modules run the
tower eagerly with explicit softmax probabilities ``A`` (a leaf requiring grad at the explained block),
the image features are built from that block's output with the model's own projector, scattered into the
model's own input embeddings, and the full VLM ``forward`` scores one unpadded sequence (prompt + answer)
at a time; one block, one image and one answer per backward. Import after
``pytest.importorskip("transformers")``.
"""

from __future__ import annotations

import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers

ANYRES_TILES = 5  # the most tiles a 64 x 64 grid needs (4 + the base tile)
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "USER:", "ASSISTANT:", "what", "is", "in", "the", "picture", "?", "a",
         "cat", "dog", "two", "cats", "red", "ball", "where", "answer", "en"]
VOCAB = 64
IMAGE_TOKEN = 63  # "<image>"
GRID = 4  # 32 px images, patch 8


def tokenizer() -> T.PreTrainedTokenizerFast:
    """A word-level fast tokenizer (whitespace split) over :data:`WORDS` plus ``<image>`` (id 63).

    The vocabulary is dense (fillers ``w22``.. up to id 62): tokens a processor adds (PaliGemma's
    ``<loc....>``) then get ids from 64 on, never one of the vocabulary's; ``image_token`` is declared so that
    processors find it after a ``save_pretrained`` / ``from_pretrained`` round trip."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab.update({f"w{i}": i for i in range(len(WORDS), IMAGE_TOKEN)})
    vocab["<image>"] = IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<image>", "<s>", "</s>", "<pad>", "<unk>"])  # split out even when glued together
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                     unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def _init(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights large enough for the answers' log-probs to depend visibly on the image."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))
            else:  # norms and biases: non-trivial too
                p.copy_((1.0 if "norm" in name and "weight" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def llava(strategy: str = "default", feature_layer: int | list = -2, blocks: int = 4, seed: int = 0):
    """LLaVA-1.5-shaped: CLIP tower (quick_gelu), 2-layer MLP projector (gelu), Llama LM."""
    vc = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=blocks, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=16)
    tc = T.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0)
    cfg = T.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN,
                        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy)
    return _init(T.LlavaForConditionalGeneration(cfg), seed)


def llava_next(seed: int = 0):
    """LLaVA-NeXT-shaped: CLIP tower on 32 px tiles, any-resolution grids up to 64 x 64 px, Llama LM."""
    vc = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=32, patch_size=8)
    tc = T.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0)
    cfg = T.LlavaNextConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                            vision_feature_select_strategy="default",
                            image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    return _init(T.LlavaNextForConditionalGeneration(cfg), seed)


def paligemma(seed: int = 0, gemma2: bool = False):
    """PaliGemma-shaped: SigLIP tower, linear projector, Gemma LM (prefix attention via token_type_ids); with
    ``gemma2``, PaliGemma-2-shaped (Gemma 2 LM: final logit soft-capping, sliding-window layers)."""
    vc = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=48)
    text = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=1, head_dim=12, vocab_size=VOCAB, pad_token_id=0)
    tc = (T.Gemma2Config(**text, final_logit_softcapping=3.0, sliding_window=8) if gemma2
          else T.GemmaConfig(**text))
    cfg = T.PaliGemmaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN, projection_dim=48)
    return _init(T.PaliGemmaForConditionalGeneration(cfg), seed)


def prompt(words: list[int], n_image: int, image_first: bool = True) -> torch.Tensor:
    """1-D prompt ids: ``<s>``, the image tokens, then ``words`` (or the words first)."""
    img = [IMAGE_TOKEN] * n_image
    return torch.tensor([1] + (img + words if image_first else words + img))


def batch(prompts: list[torch.Tensor], pixels: torch.Tensor, side: str = "left", types: bool = False) -> dict:
    """A processor-like output: the prompts padded with id 0 on ``side``."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        sl = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, sl], mask[i, sl] = p, 1
    out = {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}
    if types:
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


def _attention(attn: torch.nn.Module, x: torch.Tensor, leaf: bool):
    """Eager self-attention of a CLIP/SigLIP layer with explicit probabilities (optionally a grad leaf)."""
    b, n, c = x.shape
    h = attn.num_heads
    q = attn.q_proj(x).reshape(b, n, h, -1).transpose(1, 2)
    k = attn.k_proj(x).reshape(b, n, h, -1).transpose(1, 2)
    v = attn.v_proj(x).reshape(b, n, h, -1).transpose(1, 2)
    a = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)
    if leaf:
        a = a.detach().requires_grad_(True)
    return attn.out_proj((a @ v).transpose(1, 2).reshape(b, n, c)), a


def oracle_map(model, pixels: torch.Tensor, prompt_ids: torch.Tensor, answer: torch.Tensor, blocks: list[int],
               token: int | None = None) -> torch.Tensor:
    """Un-normalised ``[GRID, GRID]`` LeGrad map of one answer for one image (``[1, C, H, W]``) and one unpadded
    prompt, summed over ``blocks``; ``token`` scores only that answer token's log-prob."""
    kind = type(model).__name__
    vt = model.model.vision_tower
    is_llava = kind.startswith("Llava")
    seq = torch.cat([prompt_ids, answer])[None]
    k = len(prompt_ids)
    total = torch.zeros(GRID * GRID)
    for b in blocks:
        with torch.enable_grad():
            x = vt.embeddings(pixels)
            if is_llava:
                x = vt.pre_layrnorm(x)
            for i, layer in enumerate(vt.encoder.layers[: b + 1]):
                out, a = _attention(layer.self_attn, layer.layer_norm1(x), leaf=i == b)
                x = x + out
                x = x + layer.mlp(layer.layer_norm2(x))
            if is_llava:
                sel = x[:, 1:] if model.config.vision_feature_select_strategy == "default" else x
                feats = model.model.multi_modal_projector(sel)
            else:
                feats = model.model.multi_modal_projector(vt.post_layernorm(x))
            embeds = model.get_input_embeddings()(torch.where(seq == IMAGE_TOKEN, 0, seq)).detach()
            embeds = embeds.masked_scatter((seq == IMAGE_TOKEN)[..., None], feats)
            kwargs = {} if is_llava else {"token_type_ids": torch.cat(
                [torch.zeros(k, dtype=torch.long), torch.ones(len(answer), dtype=torch.long)])[None]}
            logits = model(inputs_embeds=embeds, attention_mask=torch.ones_like(seq), **kwargs).logits.float()
            logp = logits.log_softmax(-1)[0, k - 1: k - 1 + len(answer)].gather(-1, answer[:, None])[:, 0]
            score = logp.sum() if token is None else logp[token]
        (g,) = torch.autograd.grad(score, a)
        rel = g.clamp_min(0).mean(dim=(1, 2))[0]  # heads, query rows
        total += rel[1:] if is_llava else rel
    return total.reshape(GRID, GRID)


def tower_matches_model(model, pixels: torch.Tensor) -> bool:
    """The oracle's eager tower reproduces the model's own hidden states (grounds the oracle)."""
    vt = model.model.vision_tower
    ref = vt(pixels, output_hidden_states=True).hidden_states
    x = vt.embeddings(pixels)
    if type(model).__name__.startswith("Llava"):
        x = vt.pre_layrnorm(x)
    ok = torch.allclose(x, ref[0], atol=1e-5)
    for i, layer in enumerate(vt.encoder.layers):
        out, _ = _attention(layer.self_attn, layer.layer_norm1(x), leaf=False)
        x = x + out
        x = x + layer.mlp(layer.layer_norm2(x))
        ok = ok and torch.allclose(x, ref[i + 1], atol=1e-4)
    return bool(ok)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not), cloned."""
    out = {f"p:{k}": v.detach().clone() for k, v in model.named_parameters()}
    out.update({f"b:{k}": v.detach().clone() for k, v in model.named_buffers()})
    return out


def hooks(model: torch.nn.Module) -> list[tuple[str, int, int, int]]:
    """Number of forward, forward-pre and backward hooks of every module."""
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()]
