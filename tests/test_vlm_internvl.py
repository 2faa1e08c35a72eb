"""InternVL (InternViT tower: class token, layer scales, optional q/k RMSNorm; pixel-shuffle downsampling and the
LayerNorm-MLP projector) fed its REAL processor (built offline: InternVLProcessor, GotOcr2ImageProcessor, a
word-level tokenizer with InternVL's ``<img>``/``<IMG_CONTEXT>``/``</img>`` tokens; ``save_pretrained`` /
``from_pretrained`` round trip), against an oracle written here from the definition: the model's own tower
modules run eagerly with the explained block's attention probabilities as a grad leaf (checked against the
model's own eager ``attentions``), the model's own feature path (final layernorm, class token dropped,
``pixel_shuffle``, ``multi_modal_projector``), the model's own forward with ``mm_encoder_outputs``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.internvl")

from helpers import vlm_families  # noqa: E402
from helpers import vlm_models as V  # noqa: E402
from helpers.oracles import min_max  # noqa: E402
from helpers.tiny_towers import same_bits  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

from legrad import LeWrapper  # noqa: E402
from legrad.adapters.drift import DriftError  # noqa: E402

SIZE, PATCH = 48, 8  # a 6 x 6 patch grid, pixel-shuffled to 3 x 3 = 9 image tokens
GRID = SIZE // PATCH
SEQ = (GRID // 2) ** 2
SPECIAL = {"start_image_token": ("<img>", 59), "end_image_token": ("</img>", 60), "video_token": ("<video>", 61),
           "context_image_token": ("<IMG_CONTEXT>", V.IMAGE_TOKEN)}
TEXT = "<IMG_CONTEXT> what is in the picture ?"
ANSWERS = ["a cat", "two cats red"]

CONFIGS = {
    # InternVL 2.5/3-like: q/k RMSNorm, RMSNorm blocks, features of the last block through the final layernorm.
    "qk_rms_last": dict(vision=dict(use_qk_norm=True, norm_type="rms_norm", use_mean_pooling=False), layer=-1,
                        blocks=[1, 2], every=[0, 1, 2]),
    # LayerNorm blocks, no q/k norm, features from hidden_states[-2] (blocks 0 and 1 feed).
    "layer_norm_minus2": dict(vision=dict(use_qk_norm=False, norm_type="layer_norm"), layer=-2, blocks=[0, 1],
                              every=[0, 1]),
}


internvl = vlm_families.internvl  # the shared builder (tests/helpers/vlm_families.py)


def _tokenizer():
    """The word-level tokenizer of ``helpers.vlm_models`` with InternVL's image tokens (ids 59-61, 63)."""
    vocab = {w: i for i, w in enumerate(V.WORDS)}
    vocab.update({f"w{i}": i for i in range(len(V.WORDS), V.IMAGE_TOKEN)})
    for token, i in SPECIAL.values():
        vocab.pop(f"w{i}", None)
        vocab[token] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([t for t, _ in SPECIAL.values()] + ["<s>", "</s>", "<pad>", "<unk>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>",
                                                extra_special_tokens={k: t for k, (t, _) in SPECIAL.items()})


def _processor(path):
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    size = {"height": SIZE, "width": SIZE}
    processor = transformers.InternVLProcessor(
        image_processor=transformers.GotOcr2ImageProcessor(size=size, max_patches=4),
        video_processor=InternVLVideoProcessor(size=size), tokenizer=_tokenizer(), image_seq_length=SEQ)
    processor.save_pretrained(path)
    return transformers.AutoProcessor.from_pretrained(path)


def _image(seed: int = 0, shape=(40, 96)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8))


def _tower(model, pixels, block: int | None):
    """The image features from block ``block``'s output (the last feeding block when None) through the feature
    path (the model's own modules, eager attention), that block's attention probabilities as a leaf, and every
    run block's probabilities (to ground the oracle)."""
    vt, mm = model.model.vision_tower, model.model
    layer = model.config.vision_feature_layer
    feeding = len(vt.encoder.layer) if layer == -1 else len(vt.encoder.layer) + 1 + layer
    last = feeding - 1 if block is None else block
    x = vt.embeddings(pixels)
    leaf, every = None, []
    for i, blk in enumerate(vt.encoder.layer[: last + 1]):
        att = blk.attention
        h = blk.layernorm_before(x)
        b, n, c = h.shape
        q = att.q_norm(att.q_proj(h)).reshape(b, n, att.num_heads, -1).transpose(1, 2)
        k = att.k_norm(att.k_proj(h)).reshape(b, n, att.num_heads, -1).transpose(1, 2)
        v = att.v_proj(h).reshape(b, n, att.num_heads, -1).transpose(1, 2)
        a = (q @ k.transpose(-1, -2) * att.scale).softmax(-1)
        if i == block:
            a = leaf = a.detach().requires_grad_(True)
        every.append(a)
        x = x + blk.lambda_1 * att.projection_layer((a @ v).transpose(1, 2).reshape(b, n, c))
        x = x + blk.lambda_2 * blk.mlp(blk.layernorm_after(x))
    if layer == -1:
        x = vt.layernorm(x)
    y = x[:, 1:].reshape(x.shape[0], GRID, GRID, -1)
    y = mm.pixel_shuffle(y, scale_factor=model.config.downsample_ratio)
    feats = mm.multi_modal_projector(y.reshape(y.shape[0], -1, y.shape[-1]))
    return feats, leaf, every


def _log_prob(model, prompt, feats, answer):
    ids = torch.cat([prompt, answer])[None]
    enc = {"image": BaseModelOutputWithPooling(pooler_output=feats)}
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_encoder_outputs=enc).logits.float()
    k = len(prompt)
    return logits.log_softmax(-1)[0, k - 1: ids.shape[1] - 1].gather(-1, answer[:, None]).sum()


def _own_log_prob(model, inputs, answer):
    """The model's own teacher-forced log-probability from pixel values (no legrad, no oracle)."""
    ids = torch.cat([inputs["input_ids"][0], answer])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"]).logits
    k = inputs["input_ids"].shape[1]
    return float(logits.float().log_softmax(-1)[0, k - 1: ids.shape[1] - 1].gather(-1, answer[:, None]).sum())


def _oracle(model, inputs, answer, blocks):
    total = torch.zeros(GRID * GRID)
    for b in blocks:
        with torch.enable_grad():
            feats, a, _ = _tower(model, inputs["pixel_values"], b)
            score = _log_prob(model, inputs["input_ids"][0], feats, answer)
        (g,) = torch.autograd.grad(score, a)
        total += g.clamp_min(0).mean(dim=(1, 2))[0, 1:]  # heads, query rows; the class column dropped
    return total.reshape(GRID, GRID)


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_internvl_real_processor_matches_the_oracle_and_the_models_own_scores(case, tmp_path):
    model = internvl(case)
    processor = _processor(tmp_path / "internvl")
    inputs = processor(images=_image(), text=TEXT, return_tensors="pt", crop_to_patches=False)
    assert inputs["pixel_values"].shape == (1, 3, SIZE, SIZE)
    assert int((inputs["input_ids"] == V.IMAGE_TOKEN).sum()) == SEQ
    with torch.no_grad():  # the oracle's tower is the model's own (features and eager attention probabilities)
        own = model.get_image_features(inputs["pixel_values"], output_attentions=True)
        feats, _, probs = _tower(model, inputs["pixel_values"], None)
        torch.testing.assert_close(feats, own.pooler_output)
        for mine, theirs in zip(probs, own.attentions):
            torch.testing.assert_close(mine, theirs)
    before, hooks = V.snapshot(model), V.hooks(model)
    w = LeWrapper(model, tokenizer=processor)
    maps, scores = w.compute_legrad(image=inputs, answers=ANSWERS, output_size="grid", return_scores=True)
    assert maps.shape == (1, 2, GRID, GRID)
    spec = CONFIGS[case]
    for j, text in enumerate(ANSWERS):
        ans = torch.tensor(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert abs(float(scores[0, j]) - _own_log_prob(model, inputs, ans)) < 1e-4
        torch.testing.assert_close(maps[0, j], min_max(_oracle(model, inputs, ans, spec["blocks"])), atol=1e-4, rtol=0)
    every = w.compute_legrad(image=inputs, answers=ANSWERS[:1], output_size="grid", layer_index=0)
    ans = torch.tensor(processor.tokenizer(ANSWERS[0], add_special_tokens=False)["input_ids"])
    torch.testing.assert_close(every[0, 0], min_max(_oracle(model, inputs, ans, spec["every"])), atol=1e-4, rtol=0)
    assert w.compute_legrad(image=inputs, answers=ANSWERS).shape == (1, 2, SIZE, SIZE)  # the tile the processor made
    assert all(same_bits(before[k], v) for k, v in V.snapshot(model).items()) and V.hooks(model) == hooks


def test_internvl_batch_of_two_images_matches_one_by_one(tmp_path):
    model = internvl(seed=1)
    processor = _processor(tmp_path / "internvl")
    imgs, texts = [_image(0), _image(1, (64, 30))], [TEXT, TEXT + " where"]
    w = LeWrapper(model, tokenizer=processor)
    singles = torch.cat([w.compute_legrad(image=processor(images=i, text=t, return_tensors="pt",
                                                         crop_to_patches=False), answers=ANSWERS, output_size="grid")
                         for i, t in zip(imgs, texts)])
    both = processor(images=imgs, text=texts, return_tensors="pt", crop_to_patches=False, padding=True)
    assert not bool(both["attention_mask"].all())  # left padding (the processor's default side)
    torch.testing.assert_close(w.compute_legrad(image=both, answers=ANSWERS, output_size="grid"), singles,
                               atol=1e-5, rtol=0)


def test_internvl_tiles_and_unsupported_configs_are_refused(tmp_path):
    model = internvl()
    processor = _processor(tmp_path / "internvl")
    tiled = processor(images=_image(), text=TEXT, return_tensors="pt")  # crop_to_patches=True: 2 tiles + thumbnail
    assert tiled["pixel_values"].shape[0] > 1
    w = LeWrapper(model, tokenizer=processor)
    with pytest.raises(ValueError, match="crop_to_patches=False"):
        w.compute_legrad(image=tiled, answers=ANSWERS)
    model.config.vision_feature_layer = [-1, -2]
    with pytest.raises(ValueError, match="vision_feature_layer"):
        LeWrapper(model, verify=False)
    model.config.vision_feature_layer = -1
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        LeWrapper(model, verify=False)


def test_internvl_changed_block_is_refused(monkeypatch):
    model = internvl()
    blk = model.model.vision_tower.encoder.layer[0]
    original = blk.forward
    monkeypatch.setattr(blk, "forward", lambda *a, **k: original(*a, **k) * 1.01)
    with pytest.raises(DriftError, match="differs from the model's own forward"):
        LeWrapper(model)
    monkeypatch.undo()
    LeWrapper(model)
