"""Guidance that tells photos of people from photos of objects (the people probe), and names the
vocabulary lacks (said through a stand-in word, with its attention map)."""

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config
from torch import nn

from caption.config import GuideConfig, ModelConfig
from caption.decoding import DecodeConfig
from caption.decoding.constrained import Constraint, constrained_beam_search
from caption.guidance.guide import Guide
from caption.guidance.search import guided_decode, guided_search
from caption.guidance.names import ImageNetClass, everyday_name, read_classes, stand_in
from caption.guidance.people import PeopleProbe, fit_probe, load_probe, pooled
from caption.guidance.record import as_json, caption_record
from caption.decoding.search import search
from caption.model import AttentionDecoder
from caption.vocab import END_ID, Vocabulary

VOCAB = Vocabulary("a an the two of man woman boy shirt dog dogs animal animals object is on in with holding "
                   "grass young ball balls runs".split())
CLASSES = [ImageNetClass(0, "n0", "iguana", "animal", ("iguana", "iguanid", "lizard")),  # no word the vocabulary holds
           ImageNetClass(1, "n1", "beagle", "animal", ("beagle", "dog")),
           ImageNetClass(2, "n2", "soccer ball", "thing", ("soccer ball", "ball")),
           ImageNetClass(3, "n3", "zebra", "animal", ("zebra",))]


def _probe(logit: float) -> PeopleProbe:
    """A probe that says the same of every photo: people with probability sigmoid(logit)."""
    probe = PeopleProbe(4)
    with torch.no_grad():
        probe.linear.weight.zero_()
        probe.linear.bias.fill_(logit)
    return probe


def _guide(probe: PeopleProbe | None = None, **cfg) -> Guide:
    head = nn.Linear(4, len(CLASSES))
    with torch.no_grad():  # feature i (averaged over the grid) votes for class i
        head.weight.copy_(torch.eye(len(CLASSES), 4) * 10)
        head.bias.zero_()
    return Guide(head, CLASSES, VOCAB, dataclasses.replace(GuideConfig(slot_mass=0.0), **cfg), probe)


def _features(*cls: int, L: int = 4) -> torch.Tensor:
    f = torch.zeros(len(cls), L, 4)
    for b, c in enumerate(cls):
        f[b, :, c] = 1.0
    return f  # (B, L, 4)


def _ids(text: str) -> list[int]:
    return [VOCAB.stoi[w] for w in text.split()]


# ----------------------------------------------------------------------------- everyday names


def test_everyday_names_are_what_people_call_the_class():
    assert everyday_name(ImageNetClass(0, "n", "koala", "animal", ("koala", "koala bear", "native bear"))) == "koala"
    spider = ImageNetClass(0, "n", "garden spider", "animal", ("garden spider", "aranea diademata", "spider"))
    assert everyday_name(spider) == "spider"  # the label's last word names it too
    assert everyday_name(ImageNetClass(0, "n", "sea lion", "animal", ("sea lion", "eared seal", "pinniped"))) == "sea lion"
    by_label = {c.label: c for c in read_classes()}
    assert everyday_name(by_label["koala"]) == "koala"  # never "native bear"
    assert everyday_name(by_label["common iguana"]) == "iguana"
    assert everyday_name(by_label["black and gold garden spider"]) == "spider"
    assert everyday_name(by_label["teapot"]) == "teapot"
    assert stand_in(by_label["koala"], VOCAB) == "animal" and stand_in(by_label["teapot"], VOCAB) == "object"
    assert stand_in(by_label["koala"], Vocabulary(["dog"])) is None  # no stand-in word: not sayable


def test_a_name_the_vocabulary_lacks_is_searched_through_its_stand_in():
    guide = _guide()
    iguana, zebra = guide.plan(_features(0, 3))
    assert iguana.info.constraint == "iguana" and iguana.info.names == ("iguana", "iguanas")
    assert iguana.constraint.phrases == (tuple(_ids("animal")), tuple(_ids("animals")))
    assert iguana.spoken == ((tuple(_ids("animal")), "iguana"), (tuple(_ids("animals")), "iguanas"))
    assert iguana.constraint.not_after[0] == tuple(_ids("a two"))  # "an iguana": the name's article, not "animal"'s
    assert not iguana.accepts(_ids("an animal on the grass"))  # the stand-in alone does not name it
    assert zebra.info.constraint == "zebra" and zebra.constraint.not_after[0] == tuple(_ids("an two"))
    assert _guide(new_names=False).plan(_features(0))[0].info.constraint is None  # off: unsayable as before


def test_the_caption_says_the_name_in_the_stand_ins_place_with_its_attention_map():
    torch.manual_seed(0)
    decoder = AttentionDecoder(len(VOCAB), 4, tiny_model_config()).eval()
    feats = _features(0, 3) + 0.1 * torch.randn(2, 4, 4)
    options = DecodeConfig(beam_size=3, max_len=8)
    for result in guided_decode(decoder, feats, options, _guide(), vocab=VOCAB):
        (position, word), = result.guide.spelled
        assert word in ("iguana", "iguanas", "zebra", "zebras") and result.words[position] == word
        assert VOCAB.itos[result.tokens[position]] in ("animal", "animals")  # what the decoder emitted
        assert word in result.caption.split() and "animal" not in result.caption.split()
        if position and word in ("iguana", "zebra"):
            assert result.words[position - 1] != ("a" if word == "iguana" else "an")
        record = as_json(caption_record("x.jpg", result, beam=3))
        assert record["tokens"][position] == word and len(record["attention"]) == len(record["tokens"])
        assert record["guide"]["spelled"] == [{"position": position, "word": word}]


# ----------------------------------------------------------------------------- the people probe


def test_fit_probe_separates_people_and_folds_the_standardisation():
    torch.manual_seed(0)
    people = torch.rand(400) < 0.6
    x = torch.randn(400, 8) * 5 + 20  # (N, 2D), D = 4, far from standardised
    x[:, 3] += torch.where(people, 3.0, -3.0) * 5
    probe = fit_probe(x, people)
    p = torch.sigmoid(probe.linear(x).squeeze(1))
    assert ((p >= 0.5) == people).float().mean() > 0.95
    grid = torch.randn(2, 6, 4)  # (B, L, D)
    assert pooled(grid).shape == (2, 8) and probe(grid).shape == (2,)


def test_the_packaged_probe_fits_lite0_at_stage_32_only():
    lite0 = ModelConfig(encoder="efficientnet_lite0", weights="DEFAULT", stage=32)
    probe = load_probe(lite0)
    assert probe is not None and probe.linear.in_features == 2 * 1280 and not probe.linear.weight.requires_grad
    assert load_probe(dataclasses.replace(lite0, stage=16)) is None
    assert load_probe(dataclasses.replace(lite0, weights="none")) is None
    assert load_probe(dataclasses.replace(lite0, encoder="efficientnet_lite2")) is None  # no probe fitted


def test_the_probe_sees_people_in_a_real_photo_and_not_in_a_cup_of_coffee():
    pytest.importorskip("efficientnet_lite_pytorch", reason="the 'lite' extra is not installed")
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    import caption
    from caption.data.images import preprocess

    model = caption.load(threads=1, precision="fp32")
    x = torch.stack([preprocess(Image.fromarray(photo), model.transform) for photo in (data.astronaut(), data.coffee())])
    with torch.no_grad():
        astronaut, coffee = model.guide.probe(model.encoder(x)).tolist()
    assert astronaut > 0.8 > 0.2 > coffee


# ----------------------------------------------------------------------------- plans by the probe


def test_a_photo_of_people_keeps_its_plain_caption():
    guide = _guide(_probe(5.0))
    ball, animal = guide.plan(torch.cat([_features(2), _features(1)]))
    for plan in (ball, animal):  # a thing's name never takes a person's place
        assert plan.info.people > 0.99 and plan.constraint is None and plan.info.constraint is None
        assert plan.accepts(_ids("a man is holding a ball"))
    assert ball.info.labels[0][0] == "soccer ball"  # the classifier's labels are still reported


def test_in_a_photo_without_people_every_kind_is_the_subject_and_people_are_penalised():
    guide = _guide(_probe(-5.0))
    ball, nothing = guide.plan(torch.cat([_features(2), 0.1 * _features(2)]))
    assert ball.info.no_people and ball.info.people < 0.01
    assert ball.constraint.within == GuideConfig().within and VOCAB.stoi["man"] in ball.constraint.penalized
    assert ball.short == dataclasses.replace(ball.constraint, stop=True)
    # nothing sure: the plain caption stays, people and all
    assert nothing.constraint is None and nothing.accepts(_ids("a man on the grass"))


def test_without_a_probe_things_are_guided_as_before():
    (ball,) = _guide(None).plan(_features(2))
    assert ball.info.people is None and ball.constraint.within == 0
    assert not ball.constraint.penalized and ball.short is None


def test_a_caption_that_invents_after_the_name_is_cut_to_its_noun_phrase():
    (ball,) = _guide(_probe(-5.0)).plan(_features(2))
    assert ball.cut_short(_ids("a ball is on the grass with a dog"))  # another creature after it
    assert ball.cut_short(_ids("a ball in a shirt"))  # clothing
    assert not ball.cut_short(_ids("a ball is on the grass"))
    assert not ball.cut_short(_ids("a dog is holding a ball"))  # before it: the constraint's penalty decides

    torch.manual_seed(2)
    decoder = AttentionDecoder(len(VOCAB), 4, tiny_model_config()).eval()
    options = DecodeConfig(beam_size=3, max_len=10)
    with torch.no_grad():
        short = constrained_beam_search(decoder, torch.randn(4, 4, 4), options, [ball.short] * 4)
    for h in short:  # the name's noun phrase, then <end>
        assert h is not None and h.tokens[-1] == END_ID and VOCAB.itos[h.tokens[-2]] in ("ball", "balls")
        assert ball.short.satisfied_by(h.tokens) and h.alphas.shape[0] == len(h.tokens)


def test_guided_search_cuts_short_only_what_invents():
    torch.manual_seed(5)
    decoder = AttentionDecoder(len(VOCAB), 4, tiny_model_config()).eval()
    feats = _features(2, 2, 2, 2, 2, 2) + 0.3 * torch.randn(6, 4, 4)
    options = DecodeConfig(beam_size=3, max_len=10)
    guide = _guide(_probe(-5.0))
    plans = guide.plan(feats)
    with torch.no_grad():
        found = guided_search(decoder, feats, options, guide, search)
        long = constrained_beam_search(decoder, feats, options, [p.constraint for p in plans])
    cut = [p.cut_short(h.tokens) for p, h in zip(plans, long)]
    assert any(cut)  # some long captions go on to speak of another creature or thing
    for (h, info), plan, was_cut, full in zip(found, plans, cut, long):
        assert info.shaped and plan.constraint.satisfied_by(h.tokens)
        if was_cut:
            assert plan.short.satisfied_by(h.tokens) and VOCAB.itos[h.tokens[-2]] in ("ball", "balls")
        else:
            assert h.tokens == full.tokens


def test_the_words_leading_into_a_name_agree_with_it():
    a, two, young, of = (VOCAB.stoi[w] for w in ("a", "two", "young", "of"))
    balls = VOCAB.stoi["balls"]
    plural = Constraint(((balls,),), not_after=((a, VOCAB.stoi["an"]),))
    slots = [False, True, True]  # "young" sat where the model expected a noun: part of the noun phrase
    assert not plural.satisfied_by([a, young, balls], slots)  # "a young balls"
    assert plural.satisfied_by([a, young, balls])  # without slots only the word right before counts
    assert plural.satisfied_by([two, young, balls], slots)
    assert plural.satisfied_by([a, of, balls], [False, False, True])  # "a group of balls": "of" leads in


# ----------------------------------------------------------------------------- the shipped model

IMAGENET = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample-dev"


@pytest.mark.skipif(not IMAGENET.is_dir(), reason="../shared/data/imagenet-sample-dev is not beside the checkout")
def test_predict_json_says_a_name_the_vocabulary_lacks_with_its_attention_map(capsys):
    """A mongoose (no word of the shipped model's vocabulary names one): --json has the name in
    the caption and its tokens, where the stand-in was, with that word's attention map."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="the 'lite' extra is not installed")
    import json

    from caption.commands.main import main

    photo = IMAGENET / "n02137549_mongoose.jpg"
    assert main(["predict", str(photo), "--json", "--threads", "1", "--precision", "fp32"]) == 0
    record = json.loads(capsys.readouterr().out)
    (spelled,) = record["guide"]["spelled"]
    assert spelled["word"] == "mongoose" and record["tokens"][spelled["position"]] == "mongoose"
    assert "mongoose" in record["caption"].split() and record["guide"]["names"][0] == "mongoose"
    assert record["tokens"][spelled["position"] - 1] != "an"  # "a mongoose"
    assert len(record["attention"]) == len(record["tokens"]) and record["guide"]["people"] < 0.5
