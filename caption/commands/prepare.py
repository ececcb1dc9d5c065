"""``caption prepare``: the vocabulary (training split only) and the frozen encoder's feature cache."""

from __future__ import annotations

from pathlib import Path

import torch

from caption.config import Config, save_config
from caption.data.records import load_split
from caption.model import build_model
from caption.runtime import resolve_device
from caption.training.splits import build_vocab, check_config, split_data, uses_cache


def prepare(cfg: Config, run_dir: Path, *, splits: tuple[str, ...] | list[str] = ("train", "val"),
            device: str | None = None) -> dict:
    """Build what training needs before the first step; resumable and idempotent."""
    check_config(cfg)
    dev = resolve_device(device)
    train_records = load_split(cfg.data, "train")  # a missing captions file fails before anything is written
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    vocab = build_vocab(cfg, run_dir, train_records)
    summary = {"run_dir": str(run_dir), "vocab": len(vocab), "train_images": len(train_records)}
    if not uses_cache(cfg):
        summary["cache"] = "none (the encoder is fine-tuned, so features cannot be cached)"
        return summary
    torch.manual_seed(cfg.train.seed)  # the same encoder weights as training builds
    model = build_model(cfg.model, len(vocab)).to(dev)
    for split in splits:
        records = train_records if split == "train" else None
        data = split_data(cfg, split, vocab, model.encoder, run_dir, records=records, device=dev)
        summary[f"{split}_cache"] = {"path": str(data.features.prefix), "images": len(data.features),
                                     "unreadable": len(data.features.bad)}
    return summary
