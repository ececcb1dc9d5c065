"""``caption demo``: the shapes world end to end — generate, train, evaluate, caption, report.

Everything lands in one run directory; a second run reuses what is already there (the data,
a finished training run) and resumes an interrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

from caption.config import Config, load_config
from caption.errors import MissingFileError
from caption.fileio import atomic_write_json
from caption.inference import DEMO_RUN_DIR

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml"  # packaged copy of configs/shapes.yaml
RUN_DIR = DEMO_RUN_DIR  # where `caption demo` trains unless told otherwise
DONE = "done.json"


def demo_config(run_dir: Path, config: Path = CONFIG) -> Config:
    """The demo config (shipped inside the package) with its data read from ``<run_dir>/data``."""
    if not config.is_file():
        raise MissingFileError(f"demo config not found: {config} (the installed package is incomplete)")
    data = run_dir / "data"
    return load_config(config, [
        f"data.train_captions={data / 'captions_train.json'}", f"data.val_captions={data / 'captions_val.json'}",
        f"data.test_captions={data / 'captions_test.json'}", f"data.images={data / 'images'}",
    ])


def train_once(cfg: Config, run_dir: Path, device: str | None) -> None:
    """Train unless a finished run is there; resume an interrupted one."""
    from caption.train import fit

    if (run_dir / DONE).is_file() and (run_dir / "best.pt").is_file():
        print(f"reusing the trained model in {run_dir}")
        return
    resume = (run_dir / "last.pt").is_file()
    print(("resuming" if resume else "training") + f" {cfg.name} into {run_dir} (a few minutes on 2 CPU cores)")
    result = fit(cfg, run_dir, resume=resume, device=device)
    best = {f"best_val_{cfg.train.select_metric}": result.best_score}
    atomic_write_json(run_dir / DONE, {"epochs": result.epochs, **best})


def run_demo(run_dir: Path, *, device: str | None = None, n: int = 5000, seed: int = 0, examples: int = 4) -> dict:
    """Generate the shapes data, train configs/shapes.yaml, evaluate the test split with beam 3."""
    from caption.data import load_split
    from caption.decoding import DecodingOptions
    from caption.scoring import caption_records
    from caption.checkpoint import load_checkpoint
    from caption.splits import transform_for
    from caption.commands.evaluate import evaluate_checkpoint
    from caption.runtime import resolve_device
    from caption.shapes import generate_shapes

    run_dir = Path(run_dir)
    paths = generate_shapes(run_dir / "data", n=n, seed=seed, image_size=96)
    cfg = demo_config(run_dir)
    train_once(cfg, run_dir, device)
    scores = evaluate_checkpoint(run_dir, split="test", beam=3, out_dir=str(run_dir / "eval"), device=device)
    print("\nheld-out test split, beam 3:")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}, indent=1))
    loaded = load_checkpoint(run_dir, resolve_device(device))
    records = load_split(cfg.data, "test")[:examples]
    results = caption_records(loaded.model, loaded.vocab, records, DecodingOptions.from_config(cfg.decode, beam_size=3),
                              transform=transform_for(cfg, loaded.model.encoder), progress=False)
    print("\nexamples:")
    for record in records:
        print(f"{record.path}\t{results[record.image_id].caption}")
    print(f"\nrun directory: {run_dir}  (config.yaml, vocab.json, best.pt, last.pt, metrics.csv, tb/)")
    print(f"data:          {paths['images'].parent}")
    print(f"evaluation:    {run_dir / 'eval'}")
    print(f"next: caption predict {records[0].path}\n      caption attend {records[0].path} --out attention.png --html")
    return scores
