"""Targets as types (legrad.engine.targets): what compute_legrad and the methods explain, checked by the
target itself against the readout space each adapter declares."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.models import make_tiny_vit, rand_image, unit_text
from test_classifiers import make_timm

from legrad import LeWrapper
from legrad.engine import pipeline
from legrad.engine.targets import Answers, AnswerScores, Classes, Embedding, Logits, Score, Text

PKG = Path(__file__).resolve().parents[1] / "legrad"


@pytest.fixture(scope="module")
def clip():
    return LeWrapper(make_tiny_vit().double())


@pytest.fixture(scope="module")
def classifier():
    return LeWrapper(make_timm("vit-token"), layer_index=-2)


def _image(b: int = 2) -> torch.Tensor:
    return rand_image(b, 32, 32).double()


def test_readout_spaces_are_declared_per_family(clip, classifier):
    assert clip.adapter.readout_space == Embedding(32)
    assert classifier.adapter.readout_space == Logits(classifier.adapter.num_classes)
    import open_clip

    coca = open_clip.create_model("coca_ViT-B-32", pretrained=None)
    # legrad-torch 1.1 scored CoCa by a plain dot product of the un-normalised feature.
    ref = pipeline.reference_adapter(LeWrapper(coca, verify=False).adapter, "1.1")
    assert ref.readout_space == Embedding(coca.visual.output_dim, cosine=False)


def test_text_target_is_the_text_embedding_argument(clip):
    text, image = unit_text(3).double(), _image()
    want = clip.compute_legrad(text, image)
    assert torch.equal(clip.compute_legrad(image=image, target=Text(text)), want)


def test_score_target_equals_its_cosine_oracle(clip):
    text, image = unit_text(3).double(), _image()
    want = clip.compute_legrad(text, image)

    def cosine(readout: torch.Tensor) -> torch.Tensor:  # written out: normalise, then dot with each prompt
        return (readout / readout.norm(dim=-1, keepdim=True)) @ text.T

    torch.testing.assert_close(clip.compute_legrad(image=image, target=Score(cosine)), want, atol=1e-10, rtol=0)
    # A bare function is a Score target.
    torch.testing.assert_close(clip.compute_legrad(image=image, target=cosine), want, atol=1e-10, rtol=0)


def test_a_score_of_two_prompts_is_one_map_per_image(clip):
    text, image = unit_text(2).double(), _image()
    maps = clip.compute_legrad(image=image, target=lambda r: F.normalize(r, dim=-1) @ (text[[0]] - text[[1]]).T)
    assert maps.shape == (2, 1, 32, 32)
    assert not torch.allclose(maps, clip.compute_legrad(text[[0]], image))  # the contrast is not prompt 0 alone


def test_string_prompts_are_encoded_by_the_models_text_tower():
    model = make_tiny_vit().double()

    def tokenizer(texts):  # the tiny text tower's vocabulary: ids from word lengths
        rows = [[1 + len(w) for w in t.split()] + [9] for t in texts]
        return torch.tensor([r + [0] * (8 - len(r)) for r in rows])

    prompts, image = ["a cat", "a small dog"], _image()
    with torch.no_grad():
        text = model.encode_text(tokenizer(prompts), normalize=True)
    want = LeWrapper(model).compute_legrad(text, image)
    assert torch.equal(LeWrapper(model, tokenizer=tokenizer).compute_legrad(image=image, target=Text(prompts)), want)
    assert torch.equal(LeWrapper(model).compute_legrad(image=image, target=Text(prompts, tokenizer=tokenizer)), want)
    with pytest.raises(TypeError, match="tokenizer"):
        LeWrapper(model).compute_legrad(image=image, target=Text(prompts))


def test_class_targets_as_type_and_as_ints(classifier):
    image = rand_image(2, 32, 32)
    want = classifier.compute_legrad(image=image, target=[1, 3])
    assert torch.equal(classifier.compute_legrad(image=image, target=Classes([1, 3])), want)
    # A score of the logits written out picks the same logits: the same maps.
    picked = classifier.compute_legrad(image=image, target=Score(lambda logits: logits[:, [1, 3]]))
    torch.testing.assert_close(picked, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("call, exc, match", [
    (lambda w: w.compute_legrad(image=_image(), target=Classes([1])), TypeError, "selects classes"),
    (lambda w: w.compute_legrad(image=_image(), target=Answers(["a cat"])), TypeError, "vision-language"),
    (lambda w: w.compute_legrad(image=_image(), answers=["a cat"]), TypeError, "vision-language"),
    (lambda w: w.compute_legrad(unit_text(1).double(), _image(), target=Classes([1])), TypeError, "give one target"),
    (lambda w: w.compute_legrad(image=_image(), target=Score(lambda r: r.sum(-1))), ValueError, r"\[B, P\]"),
    (lambda w: w.compute_legrad(image=_image(), target=Score(lambda r: r[:, :2]), return_scores=True),
     ValueError, "score function"),
])
def test_a_target_that_does_not_fit_a_clip_is_refused(clip, call, exc, match):
    with pytest.raises(exc, match=match):
        call(clip)


def test_a_target_that_does_not_fit_a_classifier_is_refused(classifier):
    image = rand_image(1, 32, 32)
    with pytest.raises(TypeError, match="image classifier"):
        classifier.compute_legrad(image=image, target=Text(unit_text(1)))
    with pytest.raises(TypeError, match="image classifier"):
        classifier.compute_legrad(unit_text(1), image)
    with pytest.raises(ValueError, match="target is required"):
        classifier.compute_legrad(image=image)


def test_a_request_takes_target_objects_only(clip):
    request = pipeline.Request(image=_image(), target=unit_text(1).double())
    with pytest.raises(TypeError, match="Target"):
        pipeline.run(clip.adapter, clip.model, request, clip.settings())


def test_a_vlm_readout_refuses_text_and_classes():
    class FakeVLM:  # only what the targets read: the declared readout space and the family's name
        readout_space = AnswerScores()
        family = "test VLM"

    for target in (Text(unit_text(1)), Classes([1]), Score(lambda r: r)):
        with pytest.raises(TypeError, match="candidate answers"):
            target.check(FakeVLM())


def _names_scorer(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute):
        return node.attr == "scorer"
    return isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and any(
        isinstance(a, ast.Constant) and a.value == "scorer" for a in node.args)


def test_no_module_keys_behaviour_on_a_scorer_flag():
    # Targets are types: nothing compares an adapter's kind of target (a "scorer" string) any more.
    for path in [*PKG.rglob("*.py"), *(PKG.parent / "bench").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare) and any(_names_scorer(n) for n in [node.left, *node.comparators]):
                raise AssertionError(f"{path.relative_to(PKG.parent)}:{node.lineno} compares a scorer flag")
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
                    flag = isinstance(getattr(stmt, "value", None), ast.Constant)  # a string, not a function
                    assert not (flag and any(getattr(t, "id", None) == "scorer" for t in targets)), \
                        f"{path.relative_to(PKG.parent)}: class {node.name} declares a scorer flag"
