"""Decoder throughput at COCO shapes, encoder excluded; prints one JSON line.

train: teacher-forced forward + backward + AdamW step (as ``caption train``), B=32 captions of T=22 words (captions/s).
beam:  batched beam search, 32 images per call, K=5, 20 steps forced (<end> suppressed)
       (images/s).
Shapes: grid 14x14 (L=196), D=2048, V=9490, embed/hidden/attention 512.
Precision: --precision auto (default; bf16 where the CPU has bf16 units), fp32 or bf16, as ``caption train``
runs it (autocast; loss and beam scores in fp32). The JSON names the precision, device and CPU model.

    python benchmarks/decoder.py [--threads 2] [--precision auto] [--attention additive] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from caption.config import PRECISIONS, ModelConfig
from caption.decoding import DecodeConfig, beam_search
from caption.model import AttentionDecoder
from caption.runtime import cpu_name, keep_freed_memory, resolve_runtime
from caption.training.loop import adamw
from caption.training.losses import caption_loss
from caption.vocab import END_ID, START_ID


def _time(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attention", default="additive")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    keep_freed_memory()  # as the caption command does
    runtime = resolve_runtime(args.device, args.precision, args.threads)
    precision, device = runtime.precision, runtime.device
    torch.manual_seed(0)
    B, L, D, T, V = args.batch, 196, 2048, 22, 9490
    hidden = D if args.attention == "dot" else 512
    cfg = ModelConfig(attention=args.attention, embed_dim=512, hidden_dim=hidden, attention_dim=512)
    decoder = AttentionDecoder(V, D, cfg).to(device)
    optim = adamw(decoder.parameters(), lr=1e-4)  # as training builds it
    features = torch.randn(B, L, D).relu().to(device)
    captions = torch.randint(4, V, (B, T + 1)).to(device)
    captions[:, 0], captions[:, -1] = START_ID, END_ID

    def train_step() -> None:
        decoder.train()
        optim.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = caption_loss(decoder(features, captions), alpha_c=1.0)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 5.0)
        optim.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    options = DecodeConfig(beam_size=args.beam, max_len=20, min_len=20)

    def beam_call() -> None:
        decoder.eval()
        with torch.no_grad(), precision.autocast():
            beam_search(decoder, features, options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t_train = _time(train_step, args.repeats)
    t_beam = _time(beam_call, args.repeats)
    print(json.dumps({
        "benchmark": "decoder",
        "attention": args.attention,
        "threads": args.threads,
        "train_captions_per_s": round(B / t_train, 1),
        "beam_images_per_s": round(B / t_beam, 1),
        "beam_size": args.beam,
        "shapes": {"B": B, "L": L, "D": D, "T": T, "V": V, "H": hidden, "A": 512, "E": 512},
        "precision": precision.name,
        "requested": precision.requested,
        "device": str(device),
        "device_name": precision.device_name,
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
