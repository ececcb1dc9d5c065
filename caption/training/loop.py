"""Training: ``fit(cfg, run_dir)`` with resumable checkpoints, model selection on decoded val captions
(CIDEr unless ``train.select_metric`` names another validation score).

A run directory holds ``config.yaml`` (resolved), ``vocab.json``, ``last.pt`` and ``best.pt``
(atomic writes), ``metrics.csv`` (one row per epoch) and TensorBoard logs under ``tb/``.
``fit(..., resume=True)`` continues exactly where ``last.pt`` left off: model, optimizer,
scheduler, fp16 gradient scaler, epoch and step within the epoch (with the epoch's running metric sums),
and RNG states. A directory that already holds a run is refused unless resumed or overwritten,
and locked while training (:mod:`caption.training.run_dir`). Under ``torchrun`` every process takes its
share of each global batch (DistributedDataParallel, gloo on CPU, nccl on CUDA); only rank 0
logs and writes, and a frozen encoder's feature cache must be built beforehand (``caption prepare``).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from caption.checkpoint import BEST, LAST, load_state, read_checkpoint, save_checkpoint
from caption.config import Config, save_config
from caption.data.records import load_split
from caption.evaluation.scoring import caption_records, score_results
from caption.model import Captioner, build_model
from caption.runtime import Runtime, resolve_runtime
from caption.training.distributed import Dist, setup_distributed
from caption.training.objectives import Objective, build_objective, check_objective
from caption.training.pretrained import load_init_from
from caption.training.run_dir import METRICS, claim_run_dir
from caption.training.sampler import GlobalBatchSampler, batches_per_epoch
from caption.training.schedule import Schedule
from caption.training.state import Progress, check_resumable, restore, rng_state
from caption.training.splits import (
    SplitData,
    TrainingData,
    build_vocab,
    check_config,
    load_training_data,
    require_cache,
)
from caption.vocab import Vocabulary

log = logging.getLogger("caption.training.loop")


def _optimizer(model: Captioner, cfg: Config) -> torch.optim.Optimizer:
    """AdamW: the decoder at train.lr; the encoder as its own group at train.encoder_lr (used once fine-tuned)."""
    groups = [{"params": list(model.decoder.parameters()), "lr": cfg.train.lr, "name": "decoder"}]
    groups.append({"params": list(model.encoder.parameters()), "lr": cfg.train.encoder_lr, "name": "encoder"})
    return adamw(groups, weight_decay=cfg.train.weight_decay)


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where PyTorch has one (CPU and CUDA; same update).

    The default (for-each) AdamW makes several passes over every parameter and state tensor;
    the fused one makes one (benchmarks/README.md: a step's update 55 -> 15 ms).
    """
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(params, fused=fused, **kwargs)


def _fine_tuning(cfg: Config, epoch: int) -> bool:
    start = cfg.train.fine_tune_from_epoch
    return cfg.model.fine_tune or (start >= 0 and epoch >= start)


def grad_scaler(runtime: Runtime) -> torch.amp.GradScaler:
    """The run's gradient scaler: enabled for fp16 only (bf16 has fp32's range and needs none), a
    pass-through otherwise. Built once per fit: its scale carries over from epoch to epoch and is
    saved in every checkpoint."""
    return torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision.name == "fp16")


def run_epoch(run: "_Run", ddp_model: torch.nn.Module, on_step: Callable | None = None) -> bool:
    """One pass over the objective's items (the rest of it, when resumed mid-epoch), or up to
    ``train.max_steps``; returns whether the epoch was finished."""
    objective, progress, dist = run.objective, run.progress, run.dist
    loader, bar = run.epoch_batches()
    run.model.train()
    t0, seen = time.perf_counter(), 0
    for batch in loader:
        with run.runtime.autocast():
            result = objective.step(ddp_model, batch, dist)
        run.optimizer_step(result.loss)
        progress.add(result.metrics)
        seen += result.items * dist.world
        shown = {name: f"{total / max(count, 1.0):.3f}" for name, (total, count) in result.metrics.items()}
        bar.set_postfix(**shown, **{f"{objective.unit}s_s": f"{seen / (time.perf_counter() - t0):.1f}"})
        run.step_done(bar, on_step)
        if run.out_of_steps():
            break
    finished = progress.batch >= bar.total  # this rank's count (a disabled bar does not count)
    bar.close()
    return finished


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


def validate(model: Captioner, vocab: Vocabulary, data: SplitData, cfg: Config, runtime: Runtime) -> dict:
    """Decoded (not teacher-forced) captions of the val split, scored without METEOR for speed."""
    options = cfg.decode.with_overrides(beam_size=cfg.train.val_beam)
    results = caption_records(model, vocab, data.records, options, runtime=runtime, features=data.features,
                              transform=data.transform, batch_size=max(cfg.train.batch_size, 32), progress=False)
    return score_results(results, data.records, java=False, metric=data.metric).scores


@dataclass
class FitResult:
    run_dir: Path
    best_score: float  # best val score (train.select_metric)
    epochs: int  # epochs completed
    history: list  # per-epoch metric rows


def fit(cfg: Config, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
        runtime: Runtime | None = None, on_step: Callable[[Progress], None] | None = None,
        progress_bars: bool = True) -> FitResult:
    """Train ``cfg`` into ``run_dir``, continue its run with ``resume`` or start it over with
    ``overwrite``, computing in ``runtime`` (default: CUDA when available, else the CPU, in
    ``cfg.precision``); see the module docstring."""
    run_dir = Path(run_dir)
    check_config(cfg)  # a bad setting fails before anything is written
    check_objective(cfg)
    runtime = runtime or resolve_runtime(None, cfg.precision)
    dist = setup_distributed(runtime.device)
    if dist.active:  # its processes only read the feature cache: `caption prepare` builds it
        require_cache(cfg, run_dir, runtime.precision.name)
    with claim_run_dir(run_dir, resume=resume, overwrite=overwrite, lock=dist.is_main):  # before any write
        state = read_checkpoint(run_dir / LAST) if resume else None
        if state is not None:
            check_resumable(state, cfg, run_dir)
        run = _prepare(cfg, run_dir, dist, runtime.on(dist.device), state, progress_bars)
        history = _train_epochs(run, on_step)
    dist.close()
    return FitResult(run_dir, run.progress.best_score, run.progress.epoch, history)


@dataclass
class _Run:
    """What one fit trains, and ``save`` to checkpoint it (rank 0 writes)."""

    cfg: Config
    run_dir: Path
    dist: Dist
    runtime: Runtime
    vocab: Vocabulary
    model: Captioner
    data: TrainingData
    objective: Objective
    optim: torch.optim.Optimizer
    sched: Schedule
    scaler: torch.amp.GradScaler  # enabled for fp16 only (bf16 has fp32's range); its state is checkpointed
    progress: Progress
    history: list = dataclasses.field(default_factory=list)  # this fit's metric rows
    writer: Any = None  # the TensorBoard writer (rank 0), open while epochs run

    def epoch_batches(self):
        """This epoch's loader over the objective's items (the rest of it, when resumed mid-epoch) and its progress bar."""
        cfg, progress, dist, objective = self.cfg, self.progress, self.dist, self.objective
        sampler = GlobalBatchSampler(len(objective.dataset), cfg.train.batch_size, cfg.train.seed, progress.epoch, dist,
                                     skip=progress.batch, groups=objective.groups)
        loader = DataLoader(objective.dataset, batch_sampler=sampler, collate_fn=objective.collate,
                            num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(cfg.train.seed),
                            pin_memory=dist.device.type == "cuda")
        bar = tqdm(total=sampler.total, initial=progress.batch, desc=f"{cfg.train.objective} epoch {progress.epoch + 1}",
                   unit="batch", disable=not dist.is_main, dynamic_ncols=True)
        return self._readable(loader, bar), bar

    def _readable(self, loader, bar):
        """The loader's batches, counted in ``progress.batch``; a batch whose images were all unreadable is skipped."""
        for batch in loader:
            self.progress.batch += 1
            if batch is None:
                bar.update(1)
                continue
            yield batch

    def step_done(self, bar, on_step: Callable[[Progress], None] | None) -> None:
        """After a training step: the progress bar, a validation every ``train.val_every_steps`` steps,
        last.pt every ``train.checkpoint_every`` steps, ``on_step``."""
        bar.update(1)
        every, step = self.cfg.train.val_every_steps, self.progress.step
        validated = every and step % every == 0 and self.progress.batch < bar.total  # the epoch's end validates anyway
        if validated:
            _, improved, row = self.validate(fraction=self.progress.batch / bar.total)
            self.progress.improved_in_epoch |= improved
            self.save(LAST)  # best.pt, last.pt, then the metrics row (as at an epoch's end)
            self.log(row, improved)
            self.model.train()
        elif self.cfg.train.checkpoint_every and step % self.cfg.train.checkpoint_every == 0:
            self.save(LAST)
        if on_step is not None:
            on_step(self.progress)

    def out_of_steps(self) -> bool:
        """Whether ``train.max_steps`` optimizer steps are done (never, when it is 0)."""
        return 0 < self.cfg.train.max_steps <= self.progress.step

    def validate(self, fraction: float = 1.0) -> tuple[float, bool, dict]:
        """Score the val split (rank 0; every rank gets the score) and keep best.pt when it is the best
        so far; returns (score, improved, the metrics row at ``fraction`` of the current epoch)."""
        cfg, progress, dist = self.cfg, self.progress, self.dist
        scores = validate(self.model, self.vocab, self.data.val, cfg, self.runtime) if dist.is_main else {}
        # the val score that picks best.pt, drives the LR plateau and early stopping
        score = dist.broadcast_float(float(scores[cfg.train.select_metric]) if dist.is_main else 0.0)
        improved = score > progress.best_score
        progress.best_score = max(score, progress.best_score)
        epoch = progress.epoch + 1 if fraction == 1.0 else round(progress.epoch + fraction, 3)
        row = {"epoch": epoch, "step": progress.step, **progress.means(), "lr": self.optim.param_groups[0]["lr"],
               **{f"val_{k}": round(v, 4) for k, v in scores.items()}}
        if improved:
            self.save(BEST)
        return score, improved, row

    def log(self, row: dict, improved: bool) -> None:
        """A metrics row: history, metrics.csv, TensorBoard and one printed line (rank 0)."""
        self.history.append(row)
        if self.dist.is_main:
            _log_epoch(self.run_dir, self.writer, row, improved)

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Back-propagate, clip, step (through the gradient scaler: a pass-through unless fp16), advance the schedule."""
        self.optim.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optim)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optim)
        self.scaler.update()
        self.sched.after_step()
        self.progress.step += 1

    def save(self, name: str) -> None:
        if self.dist.is_main:
            objective = getattr(self.objective, "state_dict", None)  # e.g. hard attention's reward baseline
            save_checkpoint(self.run_dir / name, self.model, self.cfg, self.vocab, optimizer=self.optim.state_dict(),
                            scheduler=self.sched.state_dict(), scaler=self.scaler.state_dict(),
                            progress=dataclasses.asdict(self.progress), rng=rng_state(),
                            objective=objective() if objective is not None else {})


def _prepare(cfg: Config, run_dir: Path, dist: Dist, runtime: Runtime, state: dict | None,
             progress_bars: bool) -> _Run:
    """Config, vocabulary, model, data, objective, optimizer, scheduler and scaler; restored from ``state`` if any."""
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    init = load_init_from(cfg) if state is None and cfg.train.init_from else None  # checked before writing
    if dist.is_main:
        save_config(cfg, run_dir / "config.yaml")
    train_records = load_split(cfg.data, "train")
    if state is not None:
        vocab = Vocabulary.from_dict(state["vocab"])
    elif init is not None:  # train.init_from: its vocabulary and weights, not its optimizer
        vocab = init.vocab
        if dist.is_main:
            vocab.save(run_dir / "vocab.json")
    else:
        vocab = build_vocab(cfg, run_dir, train_records, write=dist.is_main)
    model = build_model(cfg.model, len(vocab)).to(runtime.device)  # seeded: a frozen encoder is the same every run
    if init is not None:
        load_state(model, init.model.state_dict(), init.path)
    data = load_training_data(cfg, run_dir, model.encoder, vocab, runtime=runtime, train_records=train_records,
                              dist=dist, progress=progress_bars)
    objective = build_objective(cfg, vocab, data.train)
    optim = _optimizer(model, cfg)
    steps = batches_per_epoch(len(objective.dataset), cfg.train.batch_size,
                              len(objective.groups) if objective.groups is not None else None)
    sched = Schedule(optim, cfg.train, steps_per_epoch=steps)
    scaler = grad_scaler(runtime)
    progress = Progress()
    if state is not None:
        progress = restore(state, model, optim, sched, scaler, run_dir / LAST, cfg.train.objective)
        if state.get("objective"):
            objective.load_state_dict(state["objective"])
    return _Run(cfg, run_dir, dist, runtime, vocab, model, data, objective, optim, sched, scaler, progress)


def _train_epochs(run: _Run, on_step: Callable[[Progress], None] | None) -> list[dict]:
    """Epochs until ``train.epochs`` or early stopping; returns their metric rows."""
    cfg, model, progress, dist = run.cfg, run.model, run.progress, run.dist
    run.writer = _tensorboard(run.run_dir) if dist.is_main else None
    ddp_model = None
    try:
        while (progress.epoch < cfg.train.epochs and progress.bad_epochs < cfg.train.early_stop_patience
               and not run.out_of_steps()):
            model.encoder.fine_tune(_fine_tuning(cfg, progress.epoch), cfg.model.fine_tune_blocks)
            ddp_model = dist.wrap(model, ddp_model)  # again when fine_tune changed which parameters train
            if not run_epoch(run, ddp_model, on_step):  # train.max_steps reached mid-epoch
                run.save(LAST)
                if dist.is_main:
                    tqdm.write(f"stopped at train.max_steps={cfg.train.max_steps} in epoch {progress.epoch + 1}; "
                               f"last.pt written (--resume with a larger train.max_steps goes on)")
                break
            # best.pt (when improved), then last.pt, then metrics.csv: when a write fails (a full disk),
            # resuming from the last.pt that stayed redoes the epoch and writes all of them again
            score, improved, row = run.validate()
            run.sched.after_epoch(score)
            progress.bad_epochs = 0 if improved or progress.improved_in_epoch else progress.bad_epochs + 1
            progress.epoch, progress.batch, progress.sums, progress.improved_in_epoch = progress.epoch + 1, 0, {}, False
            run.save(LAST)
            run.log(row, improved)
    finally:
        if run.writer is not None:
            run.writer.close()
    return run.history


def _log_epoch(run_dir: Path, writer, row: dict, improved: bool) -> None:
    _append_csv(run_dir / METRICS, row)
    if writer is not None:
        for key, value in row.items():
            if key not in ("epoch", "step"):
                writer.add_scalar(key, value, row["step"])  # x: optimizer steps (validations may fall mid-epoch)
        writer.flush()
    summary = ", ".join(f"{k}={v}" for k, v in row.items())
    tqdm.write(f"{summary}{'  (best)' if improved else ''}")
