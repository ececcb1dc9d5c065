"""Records from COCO and Karpathy files, load_split errors, datasets that skip bad images, collation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from caption.config import ConfigError, DataConfig
from caption.data import datasets as data_module
from caption.data.datasets import (
    CaptionDataset,
    ImageDataset,
    collate_captions,
    collate_images,
)
from caption.data.images import image_transform
from caption.data.records import ImageRecord, load_coco, load_karpathy, load_split
from caption.vocab import END_ID, PAD_ID, START_ID, Vocabulary

CAPTIONS = {
    30: ["A dog runs.", "A brown dog running on grass."],
    10: ["Two cats sleep.", "Cats on a sofa.", "A pair of cats."],
    20: ["A red bus."],
    40: ["A kite in the sky."],
    50: ["People on a beach."],
}
SPLIT = {30: "train", 10: "restval", 20: "train", 40: "val", 50: "test"}


def _make_images(folder: Path, ids, size=(12, 10)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.new("RGB", size, (i * 4, 100, 200)).save(folder / f"img_{i}.jpg")


@pytest.fixture()
def coco_files(tmp_path):
    """A COCO captions file (annotations deliberately out of image order) and its images."""
    images = tmp_path / "train2014"
    ids = [30, 10, 20]
    _make_images(images, ids)
    anns = [{"id": 100 + k, "image_id": i, "caption": c}
            for k, (i, c) in enumerate((i, c) for j in range(3) for i in ids for c in CAPTIONS[i][j:j + 1])]
    data = {
        "info": {}, "licenses": [], "type": "captions",
        "images": [{"id": i, "file_name": f"img_{i}.jpg", "width": 12, "height": 10} for i in ids],
        "annotations": anns,
    }
    path = tmp_path / "captions_train.json"
    path.write_text(json.dumps(data))
    return path, images


@pytest.fixture()
def karpathy_file(tmp_path):
    images = [{
        "filepath": "train2014" if SPLIT[i] in ("train", "restval") else "val2014",
        "filename": f"img_{i}.jpg", "split": SPLIT[i], "imgid": k, "cocoid": i,
        "sentences": [{"raw": c, "tokens": c.lower().strip(".").split()} for c in CAPTIONS[i]],
    } for k, i in enumerate(CAPTIONS)]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


def test_coco_and_karpathy_give_the_same_records(coco_files, karpathy_file, tmp_path, capsys):
    captions, images = coco_files
    coco = load_coco(captions, images)
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced
    assert [r.image_id for r in coco] == [10, 20, 30]
    assert coco[0] == ImageRecord(10, images / "img_10.jpg", tuple(CAPTIONS[10]))  # annotation order kept
    assert load_karpathy(karpathy_file, tmp_path, "train") == coco  # restval merged, filepath used
    val = load_karpathy(karpathy_file, tmp_path, "val")
    assert val == [ImageRecord(40, tmp_path / "val2014" / "img_40.jpg", tuple(CAPTIONS[40]))]
    assert [r.image_id for r in load_karpathy(karpathy_file, tmp_path, "test")] == [50]
    with pytest.raises(ValueError, match="split"):
        load_karpathy(karpathy_file, tmp_path, "restval")


def test_karpathy_flickr_style_without_filepath_or_cocoid(tmp_path):
    data = {"images": [
        {"filename": "b.jpg", "split": "train", "imgid": 7, "sentences": [{"raw": "x y", "tokens": ["x", "y"]}]},
        {"filename": "a.jpg", "split": "train", "imgid": 3, "sentences": [{"tokens": ["only", "tokens"]}]},
    ]}
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps(data))
    records = load_karpathy(tmp_path / "dataset_flickr8k.json", tmp_path / "Flicker8k_Dataset", "train")
    assert records == [
        ImageRecord(3, tmp_path / "Flicker8k_Dataset" / "a.jpg", ("only tokens",)),
        ImageRecord(7, tmp_path / "Flicker8k_Dataset" / "b.jpg", ("x y",)),
    ]


def test_load_split_reads_both_formats(coco_files, karpathy_file, tmp_path):
    captions, images = coco_files
    coco = load_split(DataConfig(format="coco", train_captions=str(captions), images=str(images)), "train")
    karpathy = load_split(DataConfig(format="karpathy", karpathy_json=str(karpathy_file), images=str(tmp_path)),
                          "train")
    assert coco == karpathy and len(coco) == 3


def test_load_split_errors_name_the_config_key(coco_files, tmp_path):
    captions, images = coco_files
    cases = [
        (DataConfig(format="coco", images=str(images)), "val", "data.val_captions' is not set"),
        (DataConfig(format="coco", val_captions=str(tmp_path / "nope.json"), images=str(images)), "val",
         "data.val_captions': file not found"),
        (DataConfig(format="karpathy", images=str(images)), "train", "data.karpathy_json' is not set"),
        (DataConfig(format="coco", train_captions=str(captions)), "train", "data.images' is not set"),
        (DataConfig(format="coco", train_captions=str(captions), images=str(tmp_path / "gone")), "train",
         "data.images': folder not found"),
        (DataConfig(format="tsv", images=str(images)), "train", "data.format"),
    ]
    for cfg, split, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_split(cfg, split)
    with pytest.raises(ValueError, match="split"):
        load_split(DataConfig(format="coco", train_captions=str(captions), images=str(images)), "dev")


def test_load_coco_rejects_other_json(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"images": [{"file_name": "x.jpg"}], "annotations": []}))
    with pytest.raises(ValueError, match="not a COCO captions file"):
        load_coco(tmp_path / "bad.json", tmp_path)


def _vocab() -> Vocabulary:
    return Vocabulary.build([c for cs in CAPTIONS.values() for c in cs], min_freq=1)


def test_caption_dataset_with_transform(coco_files):
    captions, images = coco_files
    records = load_coco(captions, images)
    vocab = _vocab()
    data = CaptionDataset(records, vocab, transform=image_transform(16, (0.5,) * 3, (0.5,) * 3), max_len=3)
    assert len(data) == 6
    item = data[1]  # second caption of image 10
    assert item.inputs.shape == (3, 16, 16) and item.image_index == 0
    assert item.caption.dtype == torch.long
    assert item.caption.tolist() == vocab.encode("Cats on a sofa.", max_len=3)
    assert item.caption[0] == START_ID and item.caption[-1] == END_ID and len(item.caption) == 5  # truncated
    with pytest.raises(ValueError, match="exactly one"):
        CaptionDataset(records, vocab)


def test_keep_images_decodes_each_image_once_and_gives_the_same_items(coco_files, monkeypatch):
    """data.keep_images: same tensors as decoding every time; each file read once, each caption tokenised once."""
    records = load_coco(*coco_files)
    transform = image_transform(16, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    plain = CaptionDataset(records, _vocab(), transform=transform)
    kept = CaptionDataset(records, _vocab(), transform=transform, keep_images=True)
    reads, encodes = [], []
    real_preprocess, real_encode = data_module.preprocess, Vocabulary.encode
    monkeypatch.setattr(data_module, "preprocess", lambda path, *a, **k: reads.append(path) or real_preprocess(path, *a, **k))
    monkeypatch.setattr(Vocabulary, "encode", lambda self, *a, **k: encodes.append(a) or real_encode(self, *a, **k))
    for _ in range(2):  # two epochs
        for i in range(len(kept)):
            a, b = plain[i], kept[i]
            assert torch.equal(a.inputs, b.inputs) and torch.equal(a.caption, b.caption)
    assert len(reads) == 2 * len(plain) + len(records)  # plain: every item, both epochs; kept: once per image
    assert len(encodes) == len(plain) * 2  # once per caption in each dataset, not once per epoch


def test_caption_dataset_with_features(coco_files):
    records = load_coco(*coco_files)

    class Store:  # duck-typed FeatureStore
        image_ids = [r.image_id for r in records]
        bad = {30}

        def __getitem__(self, i):
            return torch.full((4, 6), float(i))

    data = CaptionDataset(records, _vocab(), features=Store())
    item = data[3]  # caption of image 20, the second record
    assert item.inputs.shape == (4, 6) and item.inputs.dtype == torch.float32 and item.inputs[0, 0] == 1.0
    assert data[4] is None and data.skipped == 1  # image 30 was unreadable at cache time
    Store.image_ids = [1, 2, 3]
    with pytest.raises(ValueError, match="other records"):
        CaptionDataset(records, _vocab(), features=Store())


def test_corrupt_image_is_skipped_and_counted(coco_files, caplog):
    captions, images = coco_files
    (images / "img_30.jpg").write_bytes(b"\xff\xd8\xff garbage")  # two captions point at it
    data = CaptionDataset(load_coco(captions, images), _vocab(), transform=image_transform(8, (0,) * 3, (1,) * 3))
    loader = DataLoader(data, batch_size=2, shuffle=False, collate_fn=collate_captions)
    with caplog.at_level(logging.WARNING, logger="caption.data"):
        batches = list(loader)
        batches += list(loader)  # a second epoch: still no exception, no second warning
    assert data.skipped == 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "caption.data"]
    assert len(warnings) == 1 and "img_30.jpg" in warnings[0]
    assert batches[2] is None  # the last batch held only the bad image's two captions
    seen = [i for b in batches if b is not None for i in b.image_index.tolist()]
    assert sorted(seen) == [0] * 6 + [1] * 2  # image 10 has three captions, image 20 one; twice


def test_collate_pads_with_zero_and_keeps_lengths():
    items = [
        (torch.zeros(2, 3), torch.tensor([1, 5, 2]), 4),
        None,
        (torch.ones(2, 3), torch.tensor([1, 6, 7, 8, 2]), 9),
    ]
    from caption.data.datasets import CaptionItem

    batch = collate_captions([None if i is None else CaptionItem(*i) for i in items])
    assert batch.inputs.shape == (2, 2, 3)
    assert batch.captions.tolist() == [[1, 5, 2, PAD_ID, PAD_ID], [1, 6, 7, 8, 2]]
    assert batch.lengths.tolist() == [3, 5]
    assert batch.image_index.tolist() == [4, 9]
    assert collate_captions([None, None]) is None


def test_image_dataset_and_collate_images(coco_files):
    captions, images = coco_files
    (images / "img_20.jpg").write_text("oops")
    data = ImageDataset(load_coco(captions, images), image_transform(8, (0,) * 3, (1,) * 3))
    assert len(data) == 3 and data[1] is None and data.skipped == 1
    batch = collate_images([data[i] for i in range(3)])
    assert batch[0].shape == (2, 3, 8, 8) and batch[1].tolist() == [0, 2]
    assert collate_images([None]) is None
