"""Training: ``fit(cfg, run_dir)`` with resumable checkpoints, model selection on decoded val captions
(CIDEr unless ``train.select_metric`` names another validation score).

A run directory holds ``config.yaml`` (resolved), ``vocab.json``, ``last.pt`` and ``best.pt``
(atomic writes), ``metrics.csv`` (one row per epoch) and TensorBoard logs under ``tb/``.
``fit(..., resume=True)`` continues exactly where ``last.pt`` left off: model, optimizer,
scheduler, epoch and step within the epoch, and RNG states. Under ``torchrun`` every process
takes its share of each global batch (DistributedDataParallel, gloo on CPU, nccl on CUDA);
only rank 0 logs and writes.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from caption.checkpoint import BEST, LAST, load_state, read_checkpoint, save_checkpoint
from caption.config import Config, ConfigError, save_config
from caption.data import collate_captions
from caption.decoding import DecodingOptions
from caption.distributed import Dist, all_sum, setup_distributed
from caption.scoring import caption_records, score_results
from caption.losses import caption_loss
from caption.metrics import METRIC_KEYS
from caption.model import Captioner, build_model
from caption.data import load_split
from caption.splits import SplitData, build_vocab, load_training_data
from caption.shapes import ACCURACY_KEYS
from caption.vocab import Vocabulary

log = logging.getLogger("caption.train")


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Distributed batch sampler: global batches from a per-epoch permutation, split across ranks.

    Global batch b of epoch e is the same set of items whatever the number of processes (rank r
    takes every world-th item of it), so a DDP step equals a single-process step on the same
    global batch, and a resumed run can skip the batches it has already done.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, dist: Dist, skip: int = 0):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        self.batches = [b[dist.rank :: dist.world] for b in batches[skip:]]
        self.total = len(batches)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # batches done within the current epoch
    step: int = 0  # optimizer steps done in total
    best_score: float = -math.inf
    bad_epochs: int = 0  # epochs since the best validation score


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _optimizer(model: Captioner, cfg: Config) -> torch.optim.Optimizer:
    """AdamW: the decoder at train.lr; the encoder as its own group at train.encoder_lr (used once fine-tuned)."""
    groups = [{"params": list(model.decoder.parameters()), "lr": cfg.train.lr, "name": "decoder"}]
    groups.append({"params": list(model.encoder.parameters()), "lr": cfg.train.encoder_lr, "name": "encoder"})
    return adamw(groups, weight_decay=cfg.train.weight_decay)


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where PyTorch has one (CPU and CUDA; same update).

    The default (for-each) AdamW makes several passes over every parameter and state tensor;
    at COCO decoder shapes on 2 CPU cores that was 55 ms of a step, and 15 ms fused.
    """
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(params, fused=fused, **kwargs)


def _fine_tuning(cfg: Config, epoch: int) -> bool:
    start = cfg.train.fine_tune_from_epoch
    return cfg.model.fine_tune or (start >= 0 and epoch >= start)


def _autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA where supported, else fp16 (with a GradScaler); CPU runs fp32."""
    if device.type != "cuda" or not enabled:
        return torch.autocast(device.type, enabled=False), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def train_one_epoch(
    model: Captioner, ddp_model: torch.nn.Module, data: SplitData, optim: torch.optim.Optimizer, cfg: Config,
    progress: Progress, dist: Dist, device: torch.device, on_step: Callable | None = None, save: Callable | None = None,
) -> float:
    """One pass over the training captions; returns the mean loss per token of this process."""
    sampler = GlobalBatchSampler(len(data.dataset), cfg.train.batch_size, cfg.train.seed, progress.epoch, dist,
                                 skip=progress.batch)
    loader = DataLoader(data.dataset, batch_sampler=sampler, collate_fn=collate_captions,
                        num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(cfg.train.seed),
                        pin_memory=device.type == "cuda")
    model.train()
    autocast, scaler = _autocast(device, cfg.train.amp)
    total_loss = total_tokens = 0.0
    bar = tqdm(total=sampler.total, initial=progress.batch, desc=f"epoch {progress.epoch + 1}", unit="batch",
               disable=not dist.is_main, dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    for batch in loader:
        progress.batch += 1
        if batch is None:  # every image of this batch was unreadable
            bar.update(1)
            continue
        inputs, captions = batch.inputs.to(device, non_blocking=True), batch.captions.to(device, non_blocking=True)
        tokens = (captions[:, 1:] != 0).sum().float()
        counts = all_sum(torch.stack([tokens, torch.tensor(float(len(captions)), device=device)]), dist)
        with autocast:
            out = ddp_model(inputs, captions, features=data.features is not None)
            # normalised by the global batch, so averaging over ranks gives the single-process gradient
            loss = caption_loss(out, cfg.train.alpha_c, token_count=counts[0] / dist.world,
                                image_count=counts[1] / dist.world)
        optim.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss.total).backward()
            scaler.unscale_(optim)
        else:
            loss.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(optim) if scaler is not None else optim.step()
        if scaler is not None:
            scaler.update()
        progress.step += 1
        total_loss += loss.xent.item() * float(tokens)
        total_tokens += float(tokens)
        seen += len(captions) * dist.world
        bar.set_postfix(loss=f"{loss.xent.item():.3f}", caps_s=f"{seen / (time.perf_counter() - t0):.0f}")
        bar.update(1)
        if save is not None and cfg.train.checkpoint_every and progress.step % cfg.train.checkpoint_every == 0:
            save(LAST)
        if on_step is not None:
            on_step(progress)
    bar.close()
    return total_loss / max(total_tokens, 1.0)


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but keep training if it is broken
        log.warning("tensorboard is not importable; no TensorBoard logs")
        return None
    return SummaryWriter(str(run_dir / "tb"))


def validate(model: Captioner, vocab: Vocabulary, data: SplitData, cfg: Config, device: torch.device) -> dict:
    """Decoded (not teacher-forced) captions of the val split, scored without METEOR for speed."""
    options = DecodingOptions(beam_size=cfg.train.val_beam, max_len=cfg.decode.max_len)
    results = caption_records(model, vocab, data.records, options, features=data.features, transform=data.transform,
                              batch_size=max(cfg.train.batch_size, 32), device=device, progress=False)
    return score_results(results, data.records, java=False, shapes=data.shapes, image_size=data.shapes_size).scores


@dataclass
class FitResult:
    run_dir: Path
    best_score: float  # best val score (train.select_metric)
    epochs: int  # epochs completed
    history: list  # per-epoch metric rows


def fit(cfg: Config, run_dir: str | Path, *, resume: bool = False, device: str | None = None,
        on_step: Callable[[Progress], None] | None = None, progress_bars: bool = True) -> FitResult:
    """Train ``cfg`` into ``run_dir`` (or continue it with ``resume``); see the module docstring."""
    run_dir = Path(run_dir)
    dist = setup_distributed(device)
    dev = dist.device
    if resume and not (run_dir / LAST).is_file():
        raise FileNotFoundError(f"nothing to resume in {run_dir} (no {LAST})")
    state = read_checkpoint(run_dir / LAST) if resume else None
    if state is not None:
        _check_resumable(state, cfg, run_dir)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    train_records = load_split(cfg.data, "train")
    if state is not None:
        vocab = Vocabulary.from_dict(state["vocab"])
    else:
        vocab = build_vocab(cfg, run_dir, train_records, write=dist.is_main)
    model = build_model(cfg.model, len(vocab)).to(dev)  # seeded: a frozen encoder is the same every run
    data = load_training_data(cfg, run_dir, model.encoder, vocab, train_records=train_records, device=dev, dist=dist,
                              progress=progress_bars)
    _check_select_metric(cfg, data.val)
    optim = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optim, mode="max", factor=cfg.train.lr_decay_factor,
                                                       patience=cfg.train.lr_patience)
    progress = _restore(state, model, optim, sched, run_dir / LAST) if state is not None else Progress()
    ddp_model = dist.wrap(model)
    history: list[dict] = []
    writer = _tensorboard(run_dir) if dist.is_main else None

    def save(name: str) -> None:
        if dist.is_main:
            save_checkpoint(run_dir / name, model, cfg, vocab, optimizer=optim.state_dict(),
                            scheduler=sched.state_dict(), progress=dataclasses.asdict(progress), rng=_rng_state())

    while progress.epoch < cfg.train.epochs and progress.bad_epochs < cfg.train.early_stop_patience:
        model.encoder.fine_tune(_fine_tuning(cfg, progress.epoch), cfg.model.fine_tune_blocks)
        loss = train_one_epoch(model, ddp_model, data.train, optim, cfg, progress, dist, dev, on_step, save)
        scores = validate(model, vocab, data.val, cfg, dev) if dist.is_main else {}
        # the val score that picks best.pt, drives the LR plateau and early stopping
        score = dist.broadcast_float(float(scores[cfg.train.select_metric]) if dist.is_main else 0.0)
        sched.step(score)
        improved = score > progress.best_score
        progress.best_score, progress.bad_epochs = (score, 0) if improved else (progress.best_score, progress.bad_epochs + 1)
        progress.epoch, progress.batch = progress.epoch + 1, 0
        row = {"epoch": progress.epoch, "step": progress.step, "train_xent": round(loss, 4),
               "lr": optim.param_groups[0]["lr"], **{f"val_{k}": round(v, 4) for k, v in scores.items()}}
        history.append(row)
        if dist.is_main:
            _log_epoch(run_dir, writer, row, improved)
            save(LAST)
            if improved:
                save(BEST)
    if writer is not None:
        writer.close()
    dist.close()
    return FitResult(run_dir, progress.best_score, progress.epoch, history)


def _check_select_metric(cfg: Config, val: SplitData) -> None:
    """Fail before training when ``train.select_metric`` is not a score that validation reports."""
    known = [k for k in METRIC_KEYS if k != "METEOR"]  # validation runs without Java
    known += list(ACCURACY_KEYS) if val.shapes else []
    if cfg.train.select_metric not in known:
        raise ConfigError(f"train.select_metric: '{cfg.train.select_metric}' is not a validation score "
                          f"for this data (choose from {', '.join(known)})")


def _restore(state: dict, model: Captioner, optim, sched, path: Path) -> Progress:
    """Model, optimizer, scheduler and RNG states from a checkpoint; where training stood."""
    load_state(model, state["model"], path)
    optim.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return Progress(**state["progress"])


def _log_epoch(run_dir: Path, writer, row: dict, improved: bool) -> None:
    _append_csv(run_dir / "metrics.csv", row)
    if writer is not None:
        for key, value in row.items():
            if key != "epoch":
                writer.add_scalar(key, value, row["epoch"])
        writer.flush()
    summary = ", ".join(f"{k}={v}" for k, v in row.items())
    tqdm.write(f"{summary}{'  (best)' if improved else ''}")


def _check_resumable(state: dict, cfg: Config, path: Path) -> None:
    """Resuming must keep the model and data of the run; epochs, lr and the like may change."""
    from caption.config import from_dict

    saved = from_dict(Config, state["config"])
    if (saved.model, saved.data) != (cfg.model, cfg.data):
        raise ValueError(f"cannot resume {path}: its model/data config differs from the one given")
