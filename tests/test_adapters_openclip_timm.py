"""Every image tower family of the installed open_clip: the sweep over all configs, oracles, behaviour.

Each config is built as a shrunk random-init copy (same classes and flags; see ``tiny_towers``) and
checked against the slow per-prompt oracles of ``oracles.py``; towers LeGrad does not apply to must
raise the clear TypeError.
"""

from __future__ import annotations

import copy
import threading

import open_clip
import pytest
import torch
from helpers.oracles import coca_oracle, openclip_vit_oracle, timm_oracle
from helpers.tiny_towers import (
    WIDTH,
    build_meta,
    build_tiny,
    random_image,
    random_text,
    same_bits,
    shrunk_timm,
    timm_patch,
)

from legrad import LeWrapper
from legrad.adapters.openclip import OpenClipCoCaAdapter, OpenClipViTAdapter
from legrad.adapters.registry import adapter_classes
from legrad.adapters.timm import TimmMapAdapter, TimmViTAdapter
from legrad.pretrained import supports_model_config

ALL_CONFIGS = open_clip.list_models()
D = WIDTH  # embedding width of the tiny models (timm towers without projection output their width)
OPEN_CLIP_3_3 = open_clip.__version__ == "3.3.0"
# Towers LeGrad does not apply to: convolutional or windowed-attention image towers.
NON_VIT_TOWERS = {"ModifiedResNet", "ConvNeXt", "FastVit", "SwinTransformer"}
VIT_TIMM_MODULES = {"vision_transformer", "vision_transformer_hybrid", "vitamin", "eva", "vision_transformer_relpos"}


def _is_vit_family(name: str) -> bool:
    """Picks the builder only (tiny copy vs meta-device full size); the verdict comes from the library."""
    v = open_clip.get_model_config(name)["vision_cfg"]
    if v.get("timm_model_name"):
        from timm.models import model_entrypoint

        return model_entrypoint(v["timm_model_name"]).__module__.rsplit(".", 1)[-1] in VIT_TIMM_MODULES
    return not isinstance(v.get("layers"), (list, tuple))


def _patch(adapter) -> tuple[int, int]:
    return adapter.patch_size


def _oracle(wrapper, model, image, text, layer_index, empty=None):
    adapter = wrapper.adapter
    if isinstance(adapter, (TimmViTAdapter, TimmMapAdapter)):
        return timm_oracle(model, image, text, layer_index, empty=empty, threshold=wrapper.correction_threshold)
    assert empty is None
    if isinstance(adapter, OpenClipCoCaAdapter):
        return coca_oracle(model, image, text, layer_index)
    return openclip_vit_oracle(model, image, text, layer_index)


# ------------------------------------------------------------------------------------------------ the sweep
# The fast core sweeps one config per tower family (and per unsupported tower type); the rest is ``slow``.
SWEEP_CORE = {"ViT-B-32", "ViT-B-16-quickgelu", "coca_ViT-B-32", "ViT-B-16-SigLIP", "ViT-B-16-SigLIP2",
              "PE-Core-T-16-384", "EVA02-B-16", "ViTamin-S", "MobileCLIP-B", "vit_relpos_medium_patch16_cls_224",
              "RN50", "convnext_base", "MobileCLIP-S1", "swin_base_patch4_window7_224", "ViT-H-14-CLIPA",
              "EVA01-g-14"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in SWEEP_CORE else pytest.mark.slow)
                                  for n in ALL_CONFIGS])
def test_every_config(name):
    cfg = open_clip.get_model_config(name)
    supported = supports_model_config(name)
    if not _is_vit_family(name):
        assert not supported
        model = build_meta(name)
        tower = getattr(model.visual, "trunk", model.visual)
        assert type(tower).__name__ in NON_VIT_TOWERS
        with pytest.raises(TypeError, match="unsupported image tower"):
            LeWrapper(model)
        return
    assert supported, f"{name} has a ViT-family tower but is not claimed by any adapter"
    claimed = [cls for cls in adapter_classes() if cls.supports_config(cfg)]
    assert len(claimed) == 1, claimed
    model = build_tiny(name)
    empty = random_text(1, D, seed=7)[0]
    wrapper = LeWrapper(model, layer_index=-2, empty_text_embedding=empty)
    assert type(wrapper.adapter) is claimed[0]
    ph, pw = _patch(wrapper.adapter)
    image = random_image(2, 2 * ph, 4 * pw)  # a grid unlike the tower's own, not square
    text = random_text(2, D)
    maps = wrapper.compute_legrad(text, image=image)
    assert maps.shape == (2, 2, 2 * ph, 4 * pw) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    corrected = wrapper.adapter.uses_empty_prompt_correction
    expected = _oracle(wrapper, model, image, text, -2, empty=empty if corrected else None)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=0)


@pytest.mark.skipif(not OPEN_CLIP_3_3, reason="counts are those of open_clip 3.3.0")
def test_config_counts_per_family():
    counts = {}
    for name in ALL_CONFIGS:
        cfg = open_clip.get_model_config(name)
        for cls in adapter_classes():
            if cls.supports_config(cfg):
                counts[cls] = counts.get(cls, 0) + 1
    assert sum(counts.values()) == 116
    assert counts[OpenClipCoCaAdapter] == 2
    # SigLIP (9), SigLIP2 (17), nllb-clip-siglip (2) and PE-Core (5) pool with timm's AttentionPoolLatent
    assert counts[TimmMapAdapter] == 33


# ------------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("name", ["EVA02-B-16", "PE-Core-B-16", "ViT-B-16-SigLIP", "MobileCLIP-B",
                                  "vit_relpos_medium_patch16_cls_224", "ViTamin-S"])
@pytest.mark.parametrize("grid", [(3, 3), (4, 2), (1, 5)])
def test_timm_grids_match_oracle(name, grid):
    """The trunk's own grid (cached rotary tables) and others (rebuilt tables, resampled positions)."""
    model = build_tiny(name, seed=3)
    wrapper = LeWrapper(model, layer_index=-3, apply_correction=False)
    ph, pw = wrapper.adapter.patch_size
    image = random_image(1, grid[0] * ph, grid[1] * pw, seed=5)
    text = random_text(3, D, seed=4)
    maps = wrapper.compute_legrad(text, image=image)
    torch.testing.assert_close(maps, timm_oracle(model, image, text, -3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,layer_index", [("coca_ViT-B-32", -1), ("coca_ViT-L-14", 0)])
def test_coca_layers_and_per_image_prompts(name, layer_index):
    model = build_tiny(name, seed=1, embed_dim=24)  # pooler keys (32) wider than its queries (24)
    image = random_image(2, 24, 16)
    text = random_text(3, 24, batch=2)
    maps = LeWrapper(model, layer_index=layer_index).compute_legrad_coca(text, image=image)
    torch.testing.assert_close(maps, coca_oracle(model, image, text, layer_index), atol=1e-5, rtol=0)
    assert not torch.allclose(maps[:, 0], maps[:, 1])  # one map per prompt, not a sum over prompts


def test_coca_avg_pool_uses_the_other_queries():
    model = build_tiny("coca_ViT-B-32", vision_extra={"pool_type": "avg"})
    assert model.visual.pool_type == "avg"
    image, text = random_image(1, 16, 24), random_text(2, D)
    maps = LeWrapper(model).compute_legrad(text, image=image)
    torch.testing.assert_close(maps, coca_oracle(model, image, text, -2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,extra,vision", [
    # prefix tokens: class + 2 registers before an average pool
    ("vit_medium_patch16_gap_256", {"class_token": True, "reg_tokens": 2}, {}),
    # map pool that also attends to the prefix tokens
    ("ViT-B-16-SigLIP", {"class_token": True, "reg_tokens": 1, "pool_include_prefix": True}, {}),
    # map pool that hides them (timm's default)
    ("ViT-B-16-SigLIP", {"class_token": True}, {}),
    # layer scale and qk-norm in timm ViT blocks
    ("vit_medium_patch16_gap_256", {"init_values": 0.5, "qk_norm": True}, {}),
    # open_clip's own MLP projection head on a timm trunk
    ("vit_medium_patch16_gap_256", {}, {"timm_proj": "mlp"}),
])
def test_timm_variants_match_oracle(name, extra, vision):
    model = build_tiny(name, timm_extra=extra, vision_extra=vision)
    wrapper = LeWrapper(model, layer_index=-2, apply_correction=False)
    ph, pw = wrapper.adapter.patch_size
    image, text = random_image(2, 4 * ph, 2 * pw), random_text(2, D)
    maps = wrapper.compute_legrad(text, image=image)
    torch.testing.assert_close(maps, timm_oracle(model, image, text, -2), atol=1e-5, rtol=0)


def test_map_pool_with_several_latents():
    model = build_tiny("ViT-B-16-SigLIP")
    pool = model.visual.trunk.attn_pool
    with torch.no_grad():  # two latent queries pooled by their mean (timm's pool_type='avg')
        pool.latent = torch.nn.Parameter(torch.randn(1, 2, pool.latent.shape[-1]))
        pool.latent_len, pool.pool = 2, "avg"
    wrapper = LeWrapper(model, apply_correction=False)
    image, text = random_image(1, 32, 48), random_text(2, D)
    torch.testing.assert_close(wrapper.compute_legrad(text, image=image), timm_oracle(model, image, text, -2),
                               atol=1e-5, rtol=0)


def test_image_size_not_multiple_of_stride_is_refused():
    wrapper = LeWrapper(build_tiny("ViTamin-S"))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        wrapper.compute_legrad(random_text(1, D), image=random_image(1, 40, 32))


# ------------------------------------------------------------------------------------------------ correction
def _tokenizer(texts):
    # A deterministic stand-in for open_clip.get_tokenizer(...) on the tiny 64-word vocabulary.
    rows = [[(7 * sum(map(ord, word)) % 60) + 2 for word in t.split()][:8] for t in texts]
    return torch.tensor([r + [0] * (8 - len(r)) for r in rows])


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP2", "PE-Core-S-16-384"])
def test_correction_from_tokenizer(name):
    model = build_tiny(name, seed=2)
    image, text = random_image(2, 32, 32), random_text(3, D)
    empty = model.encode_text(_tokenizer(["a photo of a"]), normalize=True)[0].detach()
    maps = LeWrapper(model, tokenizer=_tokenizer).compute_legrad_siglip(text, image=image)
    explicit = LeWrapper(model, empty_text_embedding=empty).compute_legrad(text, image=image)
    torch.testing.assert_close(maps, explicit, atol=0, rtol=0)
    torch.testing.assert_close(maps, timm_oracle(model, image, text, -2, empty=empty), atol=1e-5, rtol=0)


def test_correction_threshold_and_switch():
    model = build_tiny("ViT-SO400M-14-SigLIP", seed=4)
    image, text = random_image(1, 42, 56), random_text(2, D)
    empty = random_text(1, D, seed=9)[0]
    wrapper = LeWrapper(model, empty_text_embedding=empty, correction_threshold=0.3)
    plain = wrapper.compute_legrad_siglip(text, image=image, apply_correction=False)
    torch.testing.assert_close(plain, timm_oracle(model, image, text, -2), atol=1e-5, rtol=0)
    low = wrapper.compute_legrad_siglip(text, image=image)
    torch.testing.assert_close(low, timm_oracle(model, image, text, -2, empty=empty, threshold=0.3),
                               atol=1e-5, rtol=0)
    assert not torch.allclose(low, plain)
    # nothing exceeds a threshold of 1: the correction changes nothing (up to float rounding: the corrected
    # path scores the empty prompt beside the text in one batch, a batch shape whose kernels may round
    # differently on another CPU; 2e-7 seen with AVX2 kernels)
    torch.testing.assert_close(wrapper.compute_legrad_siglip(text, image=image, correction_threshold=1.0), plain,
                               atol=1e-6, rtol=0)
    assert LeWrapper(model, apply_correction=False).compute_legrad(text, image=image).equal(plain)


def test_correction_needs_a_tokenizer_or_embedding():
    wrapper = LeWrapper(build_tiny("ViT-B-16-SigLIP"))
    with pytest.raises(ValueError, match="tokenizer=.*empty_text_embedding=.*apply_correction=False") as err:
        wrapper.compute_legrad(random_text(1, D), image=random_image(1, 32, 32))
    # The offline ways come first; the one that may download comes last and says so.
    message = str(err.value)
    assert message.index("get_tokenizer(model_name)") > message.index("apply_correction=False")
    assert "downloads" in message.split("get_tokenizer(model_name)", 1)[1]
    assert "local-dir:" in message
    bad = LeWrapper(wrapper.model, empty_text_embedding=torch.ones(5))
    with pytest.raises(ValueError, match="empty_text_embedding must be"):
        bad.compute_legrad(random_text(1, D), image=random_image(1, 32, 32))


def test_correction_only_on_attention_pooled_towers():
    # A CLIP tower ignores the correction (and needs no tokenizer).
    model = build_tiny("ViT-B-32")
    image, text = random_image(1, 16, 16), random_text(2, D)
    torch.testing.assert_close(LeWrapper(model).compute_legrad(text, image=image),
                               openclip_vit_oracle(model, image, text, -2), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ entry points
def test_entry_points():
    coca, siglip, clip = build_tiny("coca_ViT-B-32"), build_tiny("ViT-B-16-SigLIP"), build_tiny("EVA02-B-16")
    coca_cls = build_tiny("coca_base")  # a CoCa model whose tower pools by CLS token
    image16, image32, text = random_image(1, 16, 16), random_image(1, 32, 32), random_text(1, D)
    w = LeWrapper(coca)
    assert w.compute_legrad_coca(text, image=image16).equal(w.compute_legrad(text, image=image16))
    for call in (w.compute_legrad_clip, w.compute_legrad_siglip):
        with pytest.raises(TypeError, match="does not apply"):
            call(text, image=image16)
    w = LeWrapper(siglip, apply_correction=False)
    assert w.compute_legrad_siglip(text, image=image32).equal(w.compute_legrad(text, image=image32))
    for call in (w.compute_legrad_clip, w.compute_legrad_coca):
        with pytest.raises(TypeError, match="compute_legrad_siglip"):
            call(text, image=image32)
    w = LeWrapper(clip)
    assert w.compute_legrad_clip(text, image=image32).equal(w.compute_legrad(text, image=image32))
    with pytest.raises(TypeError, match="does not apply"):
        w.compute_legrad_siglip(text, image=image32)
    w = LeWrapper(coca_cls)
    assert isinstance(w.adapter, OpenClipViTAdapter)
    assert w.compute_legrad_coca(text, image=image16).equal(w.compute_legrad_clip(text, image=image16))


# ------------------------------------------------------------------------------------------------ integrity
FAMILY_SAMPLES = ["coca_ViT-B-32", "ViT-B-16-SigLIP2", "PE-Core-T-16-384", "EVA02-B-16", "EVA02-E-14", "ViTamin-S",
                  "MobileCLIP-B", "vit_relpos_medium_patch16_cls_224"]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}


@pytest.mark.parametrize("name", FAMILY_SAMPLES)
def test_train_mode_model_untouched_and_eval_semantics(name):
    # drop-path, dropout (attention, projections, relative-position MLP) and BatchNorm (MobileCLIP-B's
    # stem) all act differently in train mode; LeGrad must give the eval-mode maps whatever the mode.
    timm_drops = {"drop_path_rate": 0.5, "proj_drop_rate": 0.3, "attn_drop_rate": 0.3}
    model = build_tiny(name, seed=6, timm_extra=None if name.startswith("coca") else timm_drops)
    wrapper = LeWrapper(model, apply_correction=False)
    ph, pw = wrapper.adapter.patch_size
    image, text = random_image(2, 2 * ph, 3 * pw), random_text(2, D)
    eval_maps = wrapper.compute_legrad(text, image=image)
    model.train()

    def flags():
        return {n: (m.training, getattr(m, "fused_attn", None), dict(m._forward_hooks), dict(m._forward_pre_hooks))
                for n, m in model.named_modules()}

    before, state = flags(), _snapshot(model)
    maps = wrapper.compute_legrad(text, image=image)
    torch.testing.assert_close(maps, eval_maps, atol=0, rtol=0)
    after = _snapshot(model)
    assert state.keys() == after.keys() and all(same_bits(state[k], after[k]) for k in state)
    assert flags() == before
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "EVA02-L-14", "coca_ViT-B-32", "ViTamin-L"])
def test_threads(name):
    model = build_tiny(name, seed=8)
    wrapper = LeWrapper(model, apply_correction=False)
    ph, pw = wrapper.adapter.patch_size
    jobs = [(random_image(1, (2 + i % 2) * ph, (3 - i % 2) * pw, seed=i), random_text(1 + i % 3, D, seed=i))
            for i in range(6)]
    serial = [wrapper.compute_legrad(t, image=im) for im, t in jobs]
    results = [None] * len(jobs)

    def work(i):
        results[i] = wrapper.compute_legrad(jobs[i][1], image=jobs[i][0])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for a, b in zip(serial, results):
        assert a.equal(b)


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "EVA02-B-16", "coca_ViT-B-32", "MobileCLIP-B"])
def test_bfloat16(name):
    model = build_tiny(name, seed=10)
    wrapper = LeWrapper(model, apply_correction=False)
    ph, pw = wrapper.adapter.patch_size
    image, text = random_image(2, 3 * ph, 2 * pw), random_text(2, D)
    ref = wrapper.compute_legrad(text, image=image)
    low = LeWrapper(copy.deepcopy(model).to(torch.bfloat16), apply_correction=False).compute_legrad(
        text.bfloat16(), image=image.bfloat16())
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - ref).abs().mean() < 0.1


def test_sweep_builders_keep_timm_classes():
    """The shrinking helpers change sizes only: the tiny towers use the full-size towers' classes."""
    for name in ["ViTamin-L2", "MobileCLIP2-B", "PE-Core-T-16-384"]:
        tiny, full = build_tiny(name).visual.trunk, build_meta(name).visual.trunk
        kinds = {type(m) for m in tiny.modules()}
        assert kinds == {type(m) for m in full.modules()}, name
        assert timm_patch(open_clip.get_model_config(name)["vision_cfg"]["timm_model_name"]) == \
            full.patch_embed.feat_ratio(as_scalar=True)
    with shrunk_timm(32):
        pass  # the context restores timm's builders
    import open_clip.timm_model as otm
    import timm

    assert otm.timm is timm


@pytest.mark.parametrize("name", [n for n in FAMILY_SAMPLES if not n.startswith("coca")] + [
    "ViT-B-16-SigLIP", "vit_medium_patch16_gap_256", "coca_base", "ViT-L-14-CLIPA", "MobileCLIP2-L-14"])
def test_trace_embedding_is_the_models_own(name):
    """The traced forward (for gradient baselines) ends in the image tower's own embedding."""
    model = build_tiny(name, seed=11)
    adapter = LeWrapper(model).adapter
    trunk = getattr(model.visual, "trunk", None)
    h, w = trunk.patch_embed.img_size if trunk is not None else model.visual.image_size
    image = random_image(2, h, w)
    with torch.no_grad():
        steps, embedding = adapter.trace(image, torch.float32)
        expected = model.visual(image)  # what encode_image returns before its optional normalisation
        expected = expected[0] if isinstance(expected, tuple) else expected  # CoCa also returns its tokens
    torch.testing.assert_close(embedding, expected, atol=1e-5, rtol=1e-5)
    assert [s.layer for s in steps] == list(range(adapter.depth))
    with torch.enable_grad():
        grads = torch.autograd.grad(embedding.sum(), [s.out for s in steps])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------------------------------------ query blocks
@pytest.mark.parametrize("name", ["ViT-B-16", "coca_ViT-B-32", "EVA02-B-16", "ViT-B-16-SigLIP", "PE-Core-B-16"])
def test_tiny_query_blocks_equal_unblocked_and_oracle(name, monkeypatch):
    """A 1-byte working budget forces one prompt and one query row per step: same maps as one block."""
    import legrad.engine.budget as budget

    model = build_tiny(name, seed=2)
    empty = random_text(1, D, seed=7)[0]
    wrapper = LeWrapper(model, layer_index=-2, empty_text_embedding=empty)
    ph, pw = wrapper.adapter.patch_size
    image, text = random_image(2, 3 * ph, 4 * pw), random_text(3, D)
    monkeypatch.setattr(budget, "DEFAULT_WORK_BYTES", 2**40)
    whole = wrapper.compute_legrad(text, image=image)
    monkeypatch.setattr(budget, "DEFAULT_WORK_BYTES", 1)
    monkeypatch.setattr(budget, "_MIN_EFFICIENT_BLOCK", 1)
    blocked = wrapper.compute_legrad(text, image=image)
    torch.testing.assert_close(blocked, whole, atol=1e-6, rtol=0)
    corrected = wrapper.adapter.uses_empty_prompt_correction
    torch.testing.assert_close(blocked, _oracle(wrapper, model, image, text, -2, empty if corrected else None),
                               atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ test helpers
def test_tiny_coca_has_no_uninitialised_weights_and_same_bits_is_nan_aware():
    a, b = build_tiny("coca_ViT-B-32", seed=4), build_tiny("coca_ViT-B-32", seed=4)
    assert all(same_bits(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert torch.isfinite(a.text_decoder.text_projection).all()
    nan = torch.tensor([1.0, float("nan")])
    assert same_bits(nan, nan.clone()) and not torch.equal(nan, nan.clone())
    assert not same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not same_bits(nan, nan.double()) and not same_bits(nan, nan[:1])
    assert same_bits(nan[1], nan[1].clone()) and not same_bits(nan[0], nan[0] + 1)  # 0-d tensors
