"""Baselines against slow explicit-attention oracles written here, plus contract and integrity checks.

Each oracle runs one image through a deep copy of a random-init tiny open_clip ViT with the attention
probabilities ``A`` computed explicitly (softmax of ``q k^T / sqrt(d)``) and kept in the autograd
graph, takes plain ``torch.autograd.grad`` of the cosine score of the model's pooled embedding, and
applies each method's defining equation with explicit loops.
"""

from __future__ import annotations

import copy
import threading

import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers.tiny_towers import same_bits

from legrad import LeWrapper
from legrad.adapters.base import TowerAdapter
from legrad.eval.baselines import METHODS, attention_rollout, chefercam, get_method, gradcam, raw_attention

torch.set_num_threads(1)


def _tiny(pool_type: str = "tok", layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = open_clip.create_model(
        "ViT-B-16", pretrained=None, embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=layers, head_width=16, pool_type=pool_type),
        text_cfg=dict(width=32, heads=2, layers=1, context_length=8),
    )
    return model.eval()


@pytest.fixture(scope="module")
def model64():
    """Float64 tiny model, so that oracle agreement can be tight."""
    return _tiny().double()


def _inputs(batch=2, prompts=3, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, 32, 32, generator=g, dtype=dtype)
    text = F.normalize(torch.randn(prompts, 32, generator=g, dtype=dtype), dim=-1)
    return image, text


# ----------------------------------------------------------------------------- oracle
def _explicit_blocks(model, img):
    """One image ``[1, 3, H, W]`` (native size) -> (attention inputs h_l, probabilities A_l, last tokens)."""
    v = model.visual
    x = v.conv1(img).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.reshape(1, 1, -1).to(x.dtype), x], dim=1) + v.positional_embedding
    x = v.ln_pre(x)
    hs, attns = [], []
    for blk in v.transformer.resblocks:
        h = blk.ln_1(x)
        mha = blk.attn
        e, nh = mha.embed_dim, mha.num_heads
        q, k, val = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).split(e, dim=-1)
        n = h.shape[1]
        q, k, val = (t.reshape(1, n, nh, e // nh).transpose(1, 2) for t in (q, k, val))
        a = torch.softmax(q @ k.transpose(-1, -2) / (e // nh) ** 0.5, dim=-1)  # [1, heads, N, N]
        o = (a @ val).transpose(1, 2).reshape(1, n, e)
        x = x + blk.ls_1(mha.out_proj(o))
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        hs.append(h)
        attns.append(a)
    return hs, attns, x


def _explicit_forward(model, img):
    """(attention inputs h_l, probabilities A_l, the model's pooled embedding) of one image."""
    v = model.visual
    hs, attns, x = _explicit_blocks(model, img)
    if v.pool_type == "tok":
        pooled = v.ln_post(x)[:, 0]
    else:
        pooled = v.ln_post(x)[:, 1:].mean(1)
    return hs, attns, pooled @ v.proj


def _pooled_row(model, mat):
    """Row(s) of a ``[N, N]`` token matrix that the pooled embedding reads."""
    return mat[0] if model.visual.pool_type == "tok" else mat[1:].mean(0)


def _to_map(patch_rel, grid, size, normalize=True):
    m = patch_rel.reshape(1, 1, *grid).double()
    m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)[0, 0]
    if not normalize:
        return m
    lo, hi = m.min(), m.max()
    return torch.zeros_like(m) if hi - lo <= 0 else (m - lo) / (hi - lo)


def oracle(method: str, model, image, text, start_layer: int = 0, normalize: bool = True):
    model = copy.deepcopy(model).eval()
    gh, gw = image.shape[-2] // 8, image.shape[-1] // 8
    out = torch.zeros(image.shape[0], text.shape[0], *image.shape[-2:], dtype=torch.float64)
    for b in range(image.shape[0]):
        for p in range(text.shape[0]):
            hs, attns, emb = _explicit_forward(model, image[b : b + 1])
            s = (F.normalize(emb, dim=-1)[0] * text[p]).sum()
            n = attns[0].shape[-1]
            eye = torch.eye(n, dtype=torch.float64)
            if method == "raw_attention":
                rel = _pooled_row(model, attns[-1][0].mean(0))[1:]
            elif method == "rollout":
                r = eye
                for a in attns[start_layer:]:
                    r = (0.5 * a[0].mean(0) + 0.5 * eye) @ r
                rel = _pooled_row(model, r)[1:]
            elif method == "gradcam":
                (g,) = torch.autograd.grad(s, hs[-1])
                tokens = hs[-1][0, 1:]  # patch tokens [n - 1, C]
                weights = g[0, 1:].mean(0)
                rel = torch.stack([torch.relu((tokens[i] * weights).sum()) for i in range(n - 1)])
            elif method == "chefercam":
                used = attns[start_layer:]
                grads = torch.autograd.grad(s, used)
                r = eye
                for a, g in zip(used, grads):
                    abar = torch.relu(g[0] * a[0]).mean(0)
                    r = r + abar @ r
                rel = _pooled_row(model, r)[1:]
            else:
                raise AssertionError(method)
            out[b, p] = _to_map(rel.detach(), (gh, gw), tuple(image.shape[-2:]), normalize)
    return out


# ----------------------------------------------------------------------------- oracle agreement
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("method", ["raw_attention", "rollout", "gradcam", "chefercam"])
def test_method_objects_match_oracle(model64, method, normalize):
    """``legrad.methods`` classes: the oracle's maps, min-max normalised or raw (sum, upsampled), and
    the functions' maps bit for bit."""
    from legrad.methods import make_method

    image, text = _inputs()
    m = make_method(method, model64)
    got = m.attribute(image, target=text, normalize=normalize)
    assert got.shape == (2, 3, 32, 32) and got.dtype == torch.float32
    want = oracle(method, model64, image, text, normalize=normalize)
    torch.testing.assert_close(got.double(), want, atol=1e-5 * max(1.0, float(want.abs().max())), rtol=0)
    if normalize:
        assert same_bits(got, METHODS[method](model64, text, image))
    else:  # raw maps are not already min-max normalised (the check above would then prove nothing)
        assert float(got.amax(dim=(2, 3)).min()) < 0.99
    if method == "rollout":
        torch.testing.assert_close(make_method("rollout@1", model64).attribute(image, target=text).double(),
                                   oracle(method, model64, image, text, start_layer=1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["raw_attention", "rollout", "gradcam", "chefercam"])
def test_matches_oracle(model64, method):
    image, text = _inputs()
    got = METHODS[method](model64, text, image)
    want = oracle(method, model64, image, text)
    assert got.shape == (2, 3, 32, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["raw_attention", "rollout", "gradcam", "chefercam"])
def test_matches_oracle_avg_pool(method):
    model = _tiny(pool_type="avg", seed=3).double()
    image, text = _inputs(batch=1, prompts=2, seed=4)
    torch.testing.assert_close(METHODS[method](model, text, image).double(), oracle(method, model, image, text),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("fn,name", [(attention_rollout, "rollout"), (chefercam, "chefercam")])
def test_start_layer(model64, fn, name):
    image, text = _inputs(batch=1, prompts=2)
    torch.testing.assert_close(fn(model64, text, image, start_layer=1).double(),
                               oracle(name, model64, image, text, start_layer=1), atol=1e-5, rtol=0)
    # Negative indices count from the end, like LeWrapper's layer_index.
    torch.testing.assert_close(fn(model64, text, image, start_layer=-2), fn(model64, text, image, start_layer=1))


def test_float32_model_close_to_float64(model64):
    model32 = copy.deepcopy(model64).float()
    image, text = _inputs()
    for name in ("gradcam", "chefercam", "rollout"):
        a = METHODS[name](model32, text.float(), image.float())
        b = METHODS[name](model64, text, image)
        assert (a - b).abs().max() < 1e-3, name


def _tiny_coca(seed=0):
    cfg = open_clip.get_model_config("coca_ViT-B-32")
    small = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    torch.manual_seed(seed)
    return open_clip.create_model(
        "coca_ViT-B-32", pretrained=None, embed_dim=32,
        vision_cfg={**cfg["vision_cfg"], **dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16,
                                                attn_pooler_heads=2)},
        text_cfg={**cfg["text_cfg"], **small}, multimodal_cfg={**cfg["multimodal_cfg"], **small, "attn_pooler_heads": 2},
    ).eval().double()


def test_raw_attention_attention_pooler_oracle():
    """CoCa: the 'CLS row' is the contrastive pooler query's attention over the last block's tokens."""
    model = _tiny_coca()
    image, text = _inputs(batch=2, prompts=2, seed=6)
    got = raw_attention(model, text, image)
    pool = model.visual.attn_pool
    mha = pool.attn
    nh, d = mha.num_heads, mha.embed_dim // mha.num_heads
    want = torch.zeros_like(got, dtype=torch.float64)
    with torch.no_grad():
        for b in range(2):
            _, _, x = _explicit_blocks(model, image[b : b + 1])
            keys = pool.ln_k(x)[0]  # [N, C]
            query = pool.ln_q(pool.query)[0]  # contrastive query (pool_type 'tok')
            q = (mha.q_proj_weight @ query + mha.in_proj_bias[: mha.embed_dim]).reshape(nh, d)
            k = (keys @ mha.k_proj_weight.t() + mha.in_proj_bias[mha.embed_dim : 2 * mha.embed_dim]).reshape(-1, nh, d)
            probs = torch.stack([torch.softmax(k[:, h] @ q[h] / d**0.5, dim=0) for h in range(nh)])
            m = _to_map(probs.mean(0)[1:], (4, 4), (32, 32))
            want[b] = m.expand(2, -1, -1)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


def test_attention_pooler_towers_refuse_block_methods_clearly():
    model = _tiny_coca()
    image, text = _inputs(batch=1, prompts=1)
    with pytest.raises(NotImplementedError, match="attention pooler; use legrad or raw_attention"):
        attention_rollout(model, text, image)
    with pytest.raises(NotImplementedError, match="pools with attention"):
        chefercam(model, text, image)
    if type(LeWrapper(model).adapter).trace_tokens is TowerAdapter.trace_tokens:
        with pytest.raises(NotImplementedError, match="traced forward"):
            gradcam(model, text, image)
    else:  # GradCAM only needs the last block's tokens and the traced embedding
        assert gradcam(model, text, image).shape == (1, 1, 32, 32)


# ----------------------------------------------------------------------------- contract
def test_prompt_independent_methods_repeat_over_prompts(model64):
    image, text = _inputs(prompts=4)
    for fn in (raw_attention, attention_rollout):
        maps = fn(model64, text, image)
        assert maps.shape == (2, 4, 32, 32)
        for p in range(1, 4):
            assert torch.equal(maps[:, p], maps[:, 0])


def test_prompt_dependent_methods_differ_across_prompts(model64):
    image, text = _inputs(prompts=2)
    for fn in (gradcam, chefercam):
        maps = fn(model64, torch.stack([text[0], -text[0]]), image)
        assert not torch.allclose(maps[:, 0], maps[:, 1])


@pytest.mark.parametrize("method", list(METHODS))
def test_per_image_prompts_and_batching(model64, method):
    image, text = _inputs(batch=2, prompts=2)
    per_image = torch.stack([text, text.flip(0)])  # [B, P, D]
    fn = METHODS[method]
    batched = fn(model64, per_image, image)
    singles = torch.cat([fn(model64, per_image[b], image[b : b + 1]) for b in range(2)])
    torch.testing.assert_close(batched, singles, atol=1e-6, rtol=0)
    assert float(batched.min()) >= 0.0 and float(batched.max()) <= 1.0


def test_accepts_wrapper_and_inference_tensors(model64):
    image, text = _inputs(batch=1, prompts=2)
    wrapper = LeWrapper(model64)
    with torch.inference_mode():
        img_inf, txt_inf = image.clone(), text.clone()
    for name in ("rollout", "gradcam", "chefercam"):
        torch.testing.assert_close(METHODS[name](wrapper, txt_inf, img_inf), METHODS[name](model64, text, image))


def test_method_at_layer(model64):
    image, text = _inputs(batch=1, prompts=2)
    torch.testing.assert_close(get_method("legrad@-1")(model64, text, image),
                               LeWrapper(model64).compute_legrad(text, image, layer_index=-1))
    torch.testing.assert_close(get_method("chefercam@1")(model64, text, image),
                               chefercam(model64, text, image, start_layer=1))
    torch.testing.assert_close(get_method("rollout@-1")(model64, text, image),
                               attention_rollout(model64, text, image, start_layer=2))


def test_legrad_entry_matches_wrapper(model64):
    image, text = _inputs(batch=1, prompts=2)
    wrapper = LeWrapper(model64, layer_index=0)
    torch.testing.assert_close(METHODS["legrad"](wrapper, text, image), wrapper.compute_legrad(text, image))
    torch.testing.assert_close(METHODS["legrad"](model64, text, image, layer_index=0), wrapper.compute_legrad(text, image))


def test_model_left_intact_and_eval_semantics():
    model = _tiny(seed=5)
    model.train()  # dropout-free config, but mode must neither matter nor change
    before = {k: v.clone() for k, v in model.state_dict().items()}
    image, text = _inputs(batch=1, prompts=2, dtype=torch.float32)
    outs = {name: fn(model, text, image) for name, fn in METHODS.items()}
    assert model.training
    for k, v in model.state_dict().items():
        assert same_bits(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks and not mod._backward_hooks
    model.eval()
    for name, fn in METHODS.items():
        torch.testing.assert_close(fn(model, text, image), outs[name])


def test_thread_safe(model64):
    image, text = _inputs(batch=1, prompts=2)
    want = {name: METHODS[name](model64, text, image) for name in ("gradcam", "chefercam", "rollout")}
    errors = []

    def work(name):
        try:
            for _ in range(3):
                torch.testing.assert_close(METHODS[name](model64, text, image), want[name])
        except Exception as exc:  # noqa: BLE001 - reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in want for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs(model64):
    image, text = _inputs()
    with pytest.raises(ValueError, match="unsqueeze"):
        gradcam(model64, text, image[0])
    with pytest.raises(ValueError, match="width"):
        chefercam(model64, text[:, :16], image)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        raw_attention(model64, text, image[..., :30, :30])
    with pytest.raises(ValueError, match="start_layer"):
        attention_rollout(model64, text, image, start_layer=3)
    with pytest.raises(TypeError, match="start_layer"):
        chefercam(model64, text, image, start_layer=1.0)
    with pytest.raises(ValueError, match="choose from"):
        get_method("gradcam++")
    with pytest.raises(ValueError, match="legrad@K"):
        get_method("gradcam@1")
    with pytest.raises(ValueError, match="K an integer"):
        get_method("legrad@last")
    with pytest.raises(TypeError, match="must be a str"):
        get_method(None)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gradcam("not a model", text, image)
    assert get_method("chefercam") is chefercam


@pytest.mark.parametrize("name", ["ViT-B-16", "vit_relpos_medium_patch16_cls_224"])
def test_chefercam_query_blocks_equal_whole_matrix(name, monkeypatch):
    """One query row per block (relative-position bias sliced too) gives the unblocked CheferCAM."""
    from helpers.tiny_towers import build_tiny, random_image, random_text

    import legrad.methods.gradients as gradients

    model = build_tiny(name, seed=3)
    ph, pw = LeWrapper(model).adapter.patch_size
    image, text = random_image(1, 3 * ph, 2 * pw), random_text(2, 32)
    whole = chefercam(model, text, image)
    monkeypatch.setattr(gradients, "CHEFER_BLOCK_ELEMENTS", 1)
    torch.testing.assert_close(chefercam(model, text, image), whole, atol=1e-6, rtol=0)
