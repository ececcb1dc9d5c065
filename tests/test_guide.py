"""Guided captions: the packaged names table, names as token ids, the guide's plans, the guided
search (plain captions kept or searched again), and the classifier head on real features."""

import dataclasses

import pytest
import torch
from conftest import tiny_model_config
from torch import nn

from caption.config import GuideConfig
from caption.decoding import DecodeConfig, decode
from caption.guidance.guide import Guide
from caption.guidance.search import guided_decode
from caption.guidance.names import (
    ImageNetClass,
    not_after,
    plural,
    read_classes,
    read_people_words,
    sayable,
    takes_an,
    talks_of,
)
from caption.model import AttentionDecoder
from caption.vocab import UNK, Vocabulary

# ----------------------------------------------------------------------------- the packaged tables


def test_the_names_table_covers_the_classifier_head_in_order():
    classes = read_classes()
    assert [c.index for c in classes] == list(range(1000))
    assert [c.wnid for c in classes] == sorted(c.wnid for c in classes)  # the head's order: sorted by wnid
    by_label = {c.label: c for c in classes}
    assert by_label["tabby"].names[:2] == ("tabby", "tabby cat") and "cat" in by_label["tabby"].names
    assert {"owl", "bird"} <= set(by_label["great grey owl"].names)
    assert "clock" in by_label["analog clock"].names
    assert "hot dog" in by_label["hotdog"].names  # a multi-word name, whole
    assert by_label["jersey"].kind == "clothing" and by_label["seashore"].kind == "scenery"
    assert by_label["tabby"].kind == "animal" and by_label["groom"].kind == "person"


def test_the_names_table_holds_only_concrete_names():
    generic = {"being", "creature", "thing", "game", "animal", "organism", "object", "entity", "artifact",
               "device", "whole", "living thing", "equipment", UNK}
    names = {n for c in read_classes() for n in c.names}
    assert not names & generic
    assert "painter" not in dict((c.label, c.names) for c in read_classes())["cougar"]  # first an artist


def test_people_words_name_people_and_what_they_wear():
    words = read_people_words()
    assert {"skier", "bride", "surfer"} <= set(words["person"]) and {"jacket", "shirt"} <= set(words["clothing"])
    assert "great" not in words["person"]  # an adjective first


# ----------------------------------------------------------------------------- names as token ids

VOCAB = Vocabulary("a an two the cat cats dog dogs hot owl bird birds is on grass skier skiing ski man "
                   "woman boy jacket runs".split())


def test_plurals_and_forms():
    assert [plural(w) for w in ("cat", "box", "puppy", "day", "bus")] == ["cats", "boxes", "puppies", "days", "buses"]
    ids = VOCAB.stoi
    assert sayable("cat", VOCAB) == ((ids["cat"],), (ids["cats"],))
    assert sayable("hot dog", VOCAB) == ((ids["hot"], ids["dog"]), (ids["hot"], ids["dogs"]))
    assert sayable("zebra", VOCAB) == () and sayable("<unk>", VOCAB) == ()
    assert set(talks_of((ids["ski"],), VOCAB)) == {(ids["ski"],), (ids["skier"],), (ids["skiing"],)}
    assert takes_an("owl") and not takes_an("cat") and not takes_an("unicycle") and takes_an("hour")
    assert not_after("owl", False, VOCAB) == (ids["a"], ids["two"])
    assert not_after("cats", True, VOCAB) == (ids["a"], ids["an"])


# ----------------------------------------------------------------------------- plans

CLASSES = [ImageNetClass(0, "n0", "tabby", "animal", ("tabby", "cat")),
           ImageNetClass(1, "n1", "tiger cat", "animal", ("tiger cat", "cat")),
           ImageNetClass(2, "n2", "jersey", "clothing", ("jersey", "shirt")),
           ImageNetClass(3, "n3", "zebra", "animal", ("zebra",)),
           ImageNetClass(4, "n4", "ski", "thing", ("ski",))]


def _guide(**cfg) -> Guide:
    head = nn.Linear(4, len(CLASSES))
    with torch.no_grad():  # feature i (averaged over the grid) votes for class i
        head.weight.copy_(torch.eye(len(CLASSES), 4) * 10)
        head.bias.zero_()
        head.weight[4, 3], head.weight[3, 3] = 10.0, 0.0
    return Guide(head, CLASSES, VOCAB, dataclasses.replace(GuideConfig(), **cfg))


def _features(*cls: int, L: int = 4) -> torch.Tensor:
    f = torch.zeros(len(cls), L, 4)
    for b, c in enumerate(cls):
        f[b, :, c] = 1.0
    return f  # (B, L, 4)


def test_a_name_sums_the_classes_it_names():
    guide = _guide(threshold=0.5)
    head = guide.head
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0, 0] = head.weight[1, 0] = 3.0  # tabby and tiger cat split one photo
    probs = guide.probabilities(_features(0))
    assert float(probs[0, 0]) < 0.5 and float(probs[0, :2].sum()) > 0.5
    (plan,) = guide.plan(_features(0))
    assert plan.info.constraint == "cat" and "cats" in plan.info.names  # neither breed is sure, a cat is
    assert plan.constraint.within == GuideConfig().within and plan.info.no_people  # an animal: the subject
    assert set(plan.constraint.penalized) >= {VOCAB.stoi["man"], VOCAB.stoi["jacket"]}


def test_clothing_is_never_required_and_things_need_not_be_the_subject():
    guide = _guide()
    jersey, ski = guide.plan(_features(2, 3))  # feature 3 votes for the ski
    assert jersey.constraint is None and jersey.info.labels[0][0] == "jersey"
    assert ski.info.constraint == "ski" and ski.constraint.within == 0 and not ski.constraint.penalized
    assert ski.accepts([VOCAB.stoi[w] for w in "a skier is skiing".split()])  # already talks of it
    assert not ski.accepts([VOCAB.stoi[w] for w in "a man is on grass".split()])


def test_a_sure_animal_without_a_name_still_keeps_people_out():
    guide = _guide()
    with torch.no_grad():
        guide.head.weight[4, 3], guide.head.weight[3, 3] = 0.0, 10.0  # feature 3 is now a zebra
    (plan,) = guide.plan(_features(3))
    assert plan.info.constraint is None and plan.info.no_people
    assert plan.constraint.phrases == () and VOCAB.stoi["man"] in plan.constraint.penalized
    assert not plan.accepts([VOCAB.stoi[w] for w in "a man on grass".split()])


# ----------------------------------------------------------------------------- guided search


def _decoder(seed: int = 0) -> AttentionDecoder:
    torch.manual_seed(seed)
    return AttentionDecoder(len(VOCAB), 4, tiny_model_config()).eval()


def test_guided_captions_name_what_the_classifier_is_sure_of():
    decoder, guide = _decoder(), _guide(slot_mass=0.0)  # a random decoder expects no nouns anywhere
    feats = _features(0, 2, 3, 1) + 0.1 * torch.randn(4, 4, 4)
    options = DecodeConfig(beam_size=3, max_len=8)
    plain = decode(decoder, feats, options, vocab=VOCAB)
    guided = guided_decode(decoder, feats, options, guide, vocab=VOCAB)
    assert not any(hasattr(r, "guide") for r in plain)  # decoding's results know nothing of guidance
    assert all(r.guide is not None for r in guided)
    for p, g, plan in zip(plain, guided, guide.plan(feats)):
        if plan.constraint is None or plan.accepts(p.tokens):
            assert g.tokens == p.tokens and not g.guide.shaped  # nothing asked, or asked and done: as it was
        else:
            assert g.guide.shaped and plan.constraint.satisfied_by(g.tokens)
    assert guided[1].guide.constraint is None and guided[1].tokens == plain[1].tokens  # a jersey: as it was
    assert any(g.guide.shaped for g in guided)


def test_without_a_guide_the_pipeline_decodes_plainly_and_sampling_is_never_guided():
    from caption.pipeline import caption_features
    from caption.runtime import resolve_runtime

    decoder, feats = _decoder(1), torch.randn(3, 4, 4)
    options = DecodeConfig(beam_size=2, max_len=6)
    runtime = resolve_runtime("cpu", "fp32")
    first, second = decode(decoder, feats, options), caption_features(decoder, feats, options, runtime=runtime)
    assert [r.tokens for r in first] == [r.tokens for r in second] and all(r.guide is None for r in second)
    sampling, guide = DecodeConfig(temperature=1.0, samples=2, max_len=6), _guide()
    torch.manual_seed(0)
    want = decode(decoder, feats, sampling)
    torch.manual_seed(0)
    got = guided_decode(decoder, feats, sampling, guide)
    assert [r.tokens for r in got] == [r.tokens for r in want] and all(r.guide is None for r in got)


# ----------------------------------------------------------------------------- the real classifier head


def test_the_head_on_the_grid_mean_is_the_classifier_itself():
    """The shipped model's features (a real photo, the inference encoder: BatchNorm folded) through
    classifier_head equal the whole EfficientNet-Lite0 classifier's logits."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="the 'lite' extra is not installed")
    import caption
    from caption.data.images import preprocess
    from caption.inference import SAMPLE_PHOTO
    from caption.model.encoder import classifier_head, load_efficientnet_lite

    model = caption.load(threads=1, precision="fp32", guide=False)
    x = preprocess(SAMPLE_PHOTO, model.transform).unsqueeze(0)  # (1, 3, 224, 224)
    with torch.no_grad():
        logits = load_efficientnet_lite("efficientnet_lite0", pretrained=True).eval()(x)  # (1, 1000)
        mine = classifier_head(model.config.model)(model.encoder(x).mean(1))  # (1, 1000)
    torch.testing.assert_close(mine, logits, atol=1e-3, rtol=1e-4)
    assert int(logits.argmax()) == int(mine.argmax())


# ----------------------------------------------------------------------------- what users see


def test_the_viewer_shows_the_classifier_label_beside_the_caption(tmp_path):
    from conftest import FakeResult
    from PIL import Image

    from caption.guidance.result import GuideInfo
    from caption.viz import viewer

    info = GuideInfo((("tabby", 0.62), ("tiger cat", 0.2)), "cat", ("cat", "cats"), True, True, True)
    result = FakeResult(["a", "cat", "<end>"], torch.full((3, 2, 2), 0.25), "a cat", -2.0)
    result.guide = info
    Image.new("RGB", (40, 30), "gray").save(tmp_path / "p.png")
    page = viewer.write_html(result, tmp_path / "p.png", tmp_path / "p.html").read_text(encoding="utf-8")
    assert '"guide":{"labels":[{"label":"tabby","p":0.62}' in page and '"constraint":"cat"' in page
    assert "guideText" in page  # the page's script writes the labels (and the name it had to say) under the caption


def test_predict_json_carries_the_labels_and_no_guide_leaves_them_out(capsys):
    """The shipped model on the packaged sample photo (a dog): --json names the classifier's top
    labels and the constraint; --no-guide gives the plain caption and no guide field."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="the 'lite' extra is not installed")
    import json

    from caption.commands.main import main
    from caption.inference import SAMPLE_PHOTO

    args = ["predict", str(SAMPLE_PHOTO), "--json", "--threads", "1", "--precision", "fp32", "--beam", "2"]
    assert main(args) == 0
    guided = json.loads(capsys.readouterr().out)
    labels = guided["guide"]["labels"]
    assert len(labels) == 3 and labels[0]["p"] >= labels[1]["p"] > 0 and isinstance(labels[0]["label"], str)
    assert guided["guide"]["satisfied"] and "dog" in guided["caption"].split()
    assert main(args + ["--no-guide"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert "guide" not in plain and plain["caption"] == guided["caption"]  # it already named the dog


def test_an_encoder_without_an_imagenet_head_captions_unguided_and_says_so_once(tiny_checkpoint, capsys, caplog):
    import logging

    import caption

    with caplog.at_level(logging.INFO, logger="caption.inference"):
        model = caption.load(tiny_checkpoint)
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("guidance")]
    assert model.guide is None and notes == [f"guidance off: {model.guide_off}"]
    assert "small" in model.guide_off and capsys.readouterr().err == ""  # logged, not printed
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="caption.inference"):
        quiet = caption.load(tiny_checkpoint, guide=False)
    assert quiet.guide is None and not [r for r in caplog.records if r.getMessage().startswith("guidance")]


def test_the_tables_ship_in_the_wheel():
    """The names table, the people words and the people probe match a package-data pattern of pyproject.toml."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["caption"]
    for name in ("imagenet_names.tsv", "people_words.txt", "people_efficientnet_lite0.pt"):
        asset = Path("assets") / name
        assert (root / "caption" / asset).is_file() and any(asset.match(p) for p in patterns), asset
