"""Metrics against values computed by hand on tiny arrays, edge cases included."""

from __future__ import annotations

import math

import pytest
import torch

from legrad.eval.metrics import (
    DEFAULT_FRACTIONS,
    binarize,
    confusion,
    miou,
    miou_from_confusion,
    perturb,
    perturbation_auc,
    perturbation_curve,
    pixel_accuracy,
    pointing_game,
)

T, F_ = True, False


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def _m(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ----------------------------------------------------------------------------- pointing game
def test_pointing_game_hit_and_miss():
    m = _t([[0.0, 1.0], [0.5, 0.2]])
    assert pointing_game(m, _m([[F_, T], [F_, F_]])).item() == 1.0
    assert pointing_game(m, _m([[T, F_], [T, T]])).item() == 0.0


def test_pointing_game_ties_and_constant_map():
    # Two maxima, one inside: half a hit.
    assert pointing_game(_t([[1.0, 1.0], [0.0, 0.0]]), _m([[T, F_], [F_, F_]])).item() == 0.5
    # Constant 3x3 map, mask of 2 pixels: chance level 2/9.
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 0] = mask[2, 1] = True
    assert pointing_game(torch.full((3, 3), 0.3), mask).item() == pytest.approx(2 / 9)


def test_pointing_game_tolerance():
    maps = torch.zeros(2, 5, 5)
    maps[:, 0, 0] = 1.0
    masks = torch.zeros(2, 5, 5, dtype=torch.bool)
    masks[0, 0, 2] = True  # 2 px to the right of the maximum
    masks[1, 1, 1] = True  # sqrt(2) px diagonally
    assert pointing_game(maps, masks).tolist() == [0.0, 0.0]
    assert pointing_game(maps, masks, tolerance=1).tolist() == [0.0, 0.0]
    assert pointing_game(maps, masks, tolerance=2).tolist() == [1.0, 1.0]
    # Empty masks stay NaN whatever the tolerance.
    assert math.isnan(pointing_game(maps[:1], torch.zeros(1, 5, 5, dtype=torch.bool), tolerance=3).item())
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(maps, masks, tolerance=-1)


def test_pointing_game_empty_mask_is_nan_and_batched_shape():
    maps = torch.zeros(2, 3, 4, 4)
    maps[..., 1, 2] = 1.0
    masks = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    masks[0, 0, 1, 2] = True  # hit
    masks[0, 1, 0, 0] = True  # miss
    masks[1, :, 1:3, 1:3] = True  # hits
    out = pointing_game(maps, masks)  # [0, 2] has an empty mask
    assert out.shape == (2, 3) and out.dtype == torch.float64
    assert out[0, 0] == 1 and out[0, 1] == 0 and math.isnan(out[0, 2]) and bool((out[1] == 1).all())
    assert out.nanmean().item() == pytest.approx(4 / 5)


# ----------------------------------------------------------------------------- segmentation
def test_confusion_miou_pixel_accuracy_by_hand():
    maps = _t([[0.9, 0.6], [0.4, 0.1]])  # predicted object: top row
    masks = _m([[T, F_], [T, F_]])  # object: left column
    assert confusion(maps, masks).tolist() == [1, 1, 1, 1]  # TP, FP, FN, TN
    # IoU(object) = 1 / 3, IoU(background) = 1 / 3.
    assert miou(maps, masks).item() == pytest.approx(1 / 3)
    assert pixel_accuracy(maps, masks).item() == pytest.approx(0.5)


def test_threshold_is_inclusive_and_configurable():
    maps = _t([[0.5, 0.49], [0.8, 0.0]])
    assert binarize(maps).tolist() == [[True, False], [True, False]]
    assert binarize(maps, 0.8).tolist() == [[False, False], [True, False]]
    # 'mean' threshold: mean is 0.4475 -> 0.5, 0.49 and 0.8 are foreground.
    assert binarize(maps, "mean").tolist() == [[True, True], [True, False]]
    masks = _m([[T, T], [F_, F_]])
    assert confusion(maps, masks, threshold="mean").tolist() == [2, 1, 0, 1]


def test_empty_mask_and_empty_prediction():
    # Nothing predicted, nothing to find: the object class is absent, background IoU = 1.
    z = torch.zeros(2, 2)
    empty = torch.zeros(2, 2, dtype=torch.bool)
    assert confusion(z, empty).tolist() == [0, 0, 0, 4]
    assert miou(z, empty).item() == 1.0 and pixel_accuracy(z, empty).item() == 1.0
    # Everything predicted, nothing there: both IoUs 0.
    assert miou(torch.ones(2, 2), empty).item() == 0.0


def test_constant_map():
    masks = _m([[T, T], [F_, F_]])
    c = torch.full((2, 2), 0.7)  # all foreground: TP 2, FP 2 -> IoU(obj) 2/4, IoU(bg) 0/2
    assert miou(c, masks).item() == pytest.approx(0.25)
    assert pixel_accuracy(c, masks).item() == pytest.approx(0.5)
    # min-max of a constant map is all zeros (legrad's convention): all background.
    assert miou(torch.zeros(2, 2), masks).item() == pytest.approx((0 + 2 / 4) / 2)


def test_reductions():
    maps = torch.stack([_t([[0.9, 0.6], [0.4, 0.1]]), torch.zeros(2, 2)])
    masks = torch.stack([_m([[T, F_], [T, F_]]), torch.zeros(2, 2, dtype=torch.bool)])
    # Per map: (1, 1, 1, 1) -> 1/3; (0, 0, 0, 4) -> 1. Summed counts (1, 1, 1, 5): (1/3 + 5/7) / 2.
    assert miou(maps, masks, reduction="none").tolist() == pytest.approx([1 / 3, 1.0])
    assert miou(maps, masks, reduction="mean").item() == pytest.approx((1 / 3 + 1) / 2)
    assert miou(maps, masks).item() == pytest.approx((1 / 3 + 5 / 7) / 2)
    assert pixel_accuracy(maps, masks).item() == pytest.approx(6 / 8)
    counts = confusion(maps, masks)
    assert miou_from_confusion(counts.sum(0)).item() == pytest.approx((1 / 3 + 5 / 7) / 2)


# ----------------------------------------------------------------------------- perturbation
IMG = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # [1, 1, 2, 2]
MAP = torch.tensor([[[[0.1, 0.9], [0.5, 0.5]]]])  # [1, 1, 2, 2], a tie between pixels 2 and 3


def test_perturb_order_ties_and_fill():
    assert perturb(IMG, MAP, 0.0)[0, 0, 0].tolist() == [[1, 2], [3, 4]]
    assert perturb(IMG, MAP, 0.25)[0, 0, 0].tolist() == [[1, 0], [3, 4]]
    # Most relevant first: 0.9, then the first 0.5 in raster order.
    assert perturb(IMG, MAP, 0.5)[0, 0, 0].tolist() == [[1, 0], [0, 4]]
    # Least relevant first: 0.1, then the first 0.5 in raster order.
    assert perturb(IMG, MAP, 0.5, positive=False, fill=-1.0)[0, 0, 0].tolist() == [[-1, 2], [-1, 4]]
    assert perturb(IMG, MAP, 1.0)[0, 0, 0].tolist() == [[0, 0], [0, 0]]
    two = torch.cat([IMG, IMG * 10], dim=1)  # 2 channels, per-channel fill
    out = perturb(two, MAP, 0.25, fill=torch.tensor([7.0, 8.0]))
    assert out[0, 0, :, 0, 1].tolist() == [7.0, 8.0] and out[0, 0, 1, 1, 1].item() == 40.0


def test_perturbation_curve_by_hand():
    text = torch.full((1, 4), 0.5)  # normalised [1, 1, 1, 1]

    def encode(x):  # embedding = the pixels
        return x.flatten(1)

    curve = perturbation_curve(encode, IMG, text, MAP, fractions=(0.0, 0.5), batch_size=1)
    # x = [1, 2, 3, 4]: cos = 10 / (sqrt(30) * 2); positive 50%: [1, 0, 0, 4] -> 5 / (sqrt(17) * 2).
    assert curve.shape == (1, 1, 2)
    assert curve[0, 0].tolist() == pytest.approx([10 / (2 * math.sqrt(30)), 5 / (2 * math.sqrt(17))])
    neg = perturbation_curve(encode, IMG, text, MAP, positive=False, fractions=(0.0, 0.5))
    # Negative 50%: [0, 2, 0, 4] -> 6 / (sqrt(20) * 2).
    assert neg[0, 0, 1].item() == pytest.approx(6 / (2 * math.sqrt(20)))


def test_perturbation_curve_batching_and_per_image_text():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 4, 4, generator=g)
    maps = torch.rand(2, 3, 4, 4, generator=g)
    text = torch.nn.functional.normalize(torch.randn(2, 3, 48, generator=g), dim=-1)

    def encode(x):
        return x.flatten(1)

    a = perturbation_curve(encode, image, text, maps, batch_size=1)
    b = perturbation_curve(encode, image, text, maps, batch_size=7)
    assert a.shape == (2, 3, 10)
    torch.testing.assert_close(a, b)
    # Fraction 0 is the unperturbed similarity, computed directly.
    direct = torch.einsum("bd,bpd->bp", torch.nn.functional.normalize(image.flatten(1).double(), dim=-1), text.double())
    torch.testing.assert_close(a[..., 0], direct)


def test_perturbation_curve_with_open_clip_model():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(
        "ViT-B-16", pretrained=None, embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16),
        text_cfg=dict(width=32, heads=2, layers=1, context_length=8),
    ).eval()
    image = torch.randn(1, 3, 32, 32)
    text = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    maps = torch.rand(1, 2, 32, 32)
    curve = perturbation_curve(model, image, text, maps, fractions=(0.0, 0.9))
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model.encode_image(image).double(), dim=-1)
        cut = perturb(image, maps, 0.9)[0, 1][None]
        emb_cut = torch.nn.functional.normalize(model.encode_image(cut).double(), dim=-1)
    torch.testing.assert_close(curve[0, :, 0], (emb @ text.double().t())[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(curve[0, 1, 1], (emb_cut[0] * text[1].double()).sum(), atol=1e-6, rtol=0)


def test_auc():
    assert perturbation_auc(torch.ones(10)).item() == pytest.approx(0.9)
    line = torch.tensor([1.0 - f for f in DEFAULT_FRACTIONS])  # trapezoids are exact on a line
    assert perturbation_auc(line).item() == pytest.approx(0.9 - 0.9**2 / 2)
    assert perturbation_auc(torch.tensor([[0.0, 2.0]]), fractions=(0.0, 0.5)).tolist() == pytest.approx([0.5])


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs():
    maps = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="differs from maps shape"):
        pointing_game(maps, torch.zeros(2, 4, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="boolean"):
        miou(maps, torch.rand(2, 4, 4))
    assert miou(maps, torch.zeros(2, 4, 4, dtype=torch.long)).ndim == 0  # 0/1 integers are fine
    with pytest.raises(ValueError, match="NaN"):
        pointing_game(torch.full((2, 2), math.nan), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="float"):
        pointing_game(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction"):
        miou(maps, maps > 0.5, reduction="sum")
    with pytest.raises(ValueError, match="'mean'"):
        binarize(maps, "median")
    with pytest.raises(ValueError, match="increasing"):
        perturbation_auc(torch.ones(3), fractions=(0.0, 0.5, 0.5))
    with pytest.raises(ValueError, match="fill"):
        perturb(IMG, MAP, 0.5, fill=torch.zeros(3))
    with pytest.raises(ValueError, match="fraction"):
        perturb(IMG, MAP, 1.5)
    with pytest.raises(ValueError, match="one prompt per map"):
        perturbation_curve(lambda x: x.flatten(1), IMG, torch.ones(2, 4), MAP)
    with pytest.raises(ValueError, match="matching the image batch"):
        perturbation_curve(lambda x: x.flatten(1), IMG, torch.ones(1, 4), MAP[..., :1])
    with pytest.raises(TypeError, match="encode_image"):
        perturbation_curve(3, IMG, torch.ones(1, 4), MAP)


# ----------------------------------------------------------------------------- perturbation of classifiers
def _tiny_classifier():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=2,
                              embed_dim=16, num_heads=2, num_classes=6)
    with torch.no_grad():
        model.head.weight.normal_()
    return model.eval()


def test_perturbation_curve_classifier_scores_the_target_logit():
    """Each value is the target's logit of the model's own forward on the perturbed image, computed directly."""
    from legrad import LeWrapper

    model = _tiny_classifier()
    g = torch.Generator().manual_seed(3)
    image = torch.randn(2, 3, 16, 16, generator=g)
    maps = torch.rand(2, 2, 16, 16, generator=g)
    target = torch.tensor([[1, 4], [5, 1]])
    fractions = (0.0, 0.25, 0.75)
    curve = perturbation_curve(model, image, maps=maps, target=target, fractions=fractions, batch_size=5)
    assert curve.shape == (2, 2, 3) and curve.dtype == torch.float64
    with torch.no_grad():
        for fi, frac in enumerate(fractions):
            cut = perturb(image, maps, frac, positive=True)
            for b in range(2):
                for p in range(2):
                    want = model(cut[b, p][None])[0, target[b, p]].double()
                    torch.testing.assert_close(curve[b, p, fi], want, atol=1e-5, rtol=0)
    # A wrapper runs the same forward; shared targets broadcast over the batch; negative order differs.
    # (the default batch size differs from 5: float32 logits of other batch shapes, hence float32 tolerances)
    torch.testing.assert_close(perturbation_curve(LeWrapper(model), image, maps=maps, target=target,
                                                  fractions=fractions), curve, atol=1e-5, rtol=0)
    shared = perturbation_curve(model, image, None, maps, target=[1, 4], fractions=fractions)
    torch.testing.assert_close(shared[0], curve[0], atol=1e-5, rtol=0)
    neg = perturbation_curve(model, image, maps=maps, target=target, positive=False, fractions=fractions)
    torch.testing.assert_close(neg[..., 0], curve[..., 0], atol=1e-5, rtol=0)
    assert not torch.allclose(neg[..., 2], curve[..., 2])


def test_perturbation_curve_classifier_output_with_logits_attribute():
    model = _tiny_classifier()

    class Output:
        def __init__(self, logits):
            self.logits = logits

    image, maps = torch.randn(1, 3, 16, 16), torch.rand(1, 1, 16, 16)
    a = perturbation_curve(lambda x: Output(model(x)), image, maps=maps, target=3, fractions=(0.0, 0.5))
    torch.testing.assert_close(a, perturbation_curve(model, image, maps=maps, target=3, fractions=(0.0, 0.5)))


def test_perturbation_curve_classifier_bad_inputs():
    model = _tiny_classifier()
    calls = []

    def counting(x):
        calls.append(len(x))
        return model(x)

    counting.num_classes = 6
    image, maps = torch.randn(1, 3, 16, 16), torch.rand(1, 2, 16, 16)
    with pytest.raises(TypeError, match="not both"):
        perturbation_curve(model, image, torch.ones(2, 6), maps, target=[1, 2])
    with pytest.raises(ValueError, match="one class per map"):
        perturbation_curve(model, image, maps=maps, target=[1, 2, 3])
    with pytest.raises(ValueError, match="out of range: this model has 6 classes"):
        perturbation_curve(counting, image, maps=maps, target=[1, 6])
    with pytest.raises(TypeError, match="sequence of ints"):
        perturbation_curve(counting, image, maps=maps, target=[1.0, 2.0])
    with pytest.raises(ValueError, match="maps is required"):
        perturbation_curve(model, image, target=[1, 2])
    assert calls == []  # all refused before any forward pass
    with pytest.raises(ValueError, match="out of range: this model has 6 classes"):  # class count only seen in the logits
        perturbation_curve(lambda x: model(x), image, maps=maps, target=[1, 9])
    with pytest.raises(TypeError, match=r"logits \[N, K\]"):
        perturbation_curve(lambda x: x.flatten(1).sum(1), image, maps=maps, target=[1, 2])
