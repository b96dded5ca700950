"""Decode throughput through the continuous-batching scheduler: batch 1 against batch 8.

    .venv/bin/python -m bench.bench_scheduler [--size mid] [--threads 2] [--context 300] [--tokens 48]

Not a test. Loads the ``--size`` bundle written by ``bundles.llm_bundle`` (fp32 on CPU; the full
bundle in bf16 on CUDA when a GPU is present and ``--size full``), then for each batch size submits
that many greedy requests of ``--context`` audio ids (different lengths, as real requests are) to
an ``llm.scheduler.Scheduler`` (the server's decode loop) and times its decode steps as its observer
sees them (``bench.decode_timing``). The first request holds the loop in its first step until all
are queued, so the batch is full from step 2. Reported per batch: decode tokens/s while the whole
batch runs (requests / median step seconds, robust on a shared machine), tokens/s over every step
(ids / total step seconds), and the rate of the model's forward alone on the same cache rows
(``bench.bench_llm.model_step_s``: no sampling, no bookkeeping) for the loop's overhead.
Batch ``8g`` is 8 guided requests (intensity 2: 16 rows).

Writes ``bench/out/scheduler.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from bench.bench_llm import OUT_DIR, _bundle, model_step_s
from bench.decode_timing import audio_prompts, time_decode
from llm.scheduler import Scheduler
from model_loader import enable_tf32, load_llm

logger = logging.getLogger(__name__)


def through_scheduler(model: torch.nn.Module, batch: int, context: int, tokens: int, intensity: float) -> dict:
    """Decode rates of ``batch`` greedy requests of ``tokens`` ids sharing one scheduler."""
    sched = Scheduler(model, max_batch_rows=2 * batch, kv_budget_bytes=2**40)
    try:
        timing = time_decode(sched, audio_prompts(batch, context), max_new_tokens=tokens, intensity=intensity)
    finally:
        sched.close()
    return {
        "batch": batch,
        "rows": timing.rows,
        "ids": timing.ids,
        "wall_s": timing.wall_s,
        "steps": len(timing.steps),
        "full_batch_tokens_per_s": timing.full_batch_tokens_per_s,
        "all_steps_tokens_per_s": timing.all_steps_tokens_per_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="mid", choices=["tiny", "mid", "full"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--root", type=Path, default=OUT_DIR / "llm-bundles")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    if args.size == "full" and torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
        enable_tf32()
    else:
        device, dtype = torch.device("cpu"), torch.float32
    model = load_llm(_bundle(args.root, args.size, device), "base", device, dtype)
    through_scheduler(model, 2, 64, 6, 1.0)  # warm-up
    rows = []
    for batch, intensity in ((1, 1.0), (8, 1.0), (8, 2.0)):
        r = through_scheduler(model, batch, args.context, args.tokens, intensity)
        r["bare_model_tokens_per_s"] = batch / model_step_s(model, r["rows"], args.context, 16)
        r["label"] = f"{batch}{'g' if intensity != 1.0 else ''}"
        rows.append(r)
    print(
        f"\nScheduler decode, greedy, {args.size} on {device.type} ({dtype}), context {args.context}, "
        f"{args.tokens} ids per request, {args.threads} threads"
    )
    print(
        f"{'batch':>5} {'rows':>4} {'steps':>5} {'full-batch tok/s':>16} {'all-steps tok/s':>15}"
        f" {'bare model tok/s':>16}"
    )
    for r in rows:
        print(
            f"{r['label']:>5} {r['rows']:4d} {r['steps']:5d} {r['full_batch_tokens_per_s']:16.1f} "
            f"{r['all_steps_tokens_per_s']:15.1f} {r['bare_model_tokens_per_s']:16.1f}"
        )
    base = rows[0]["full_batch_tokens_per_s"]
    print(f"batch 8 / batch 1: {rows[1]['full_batch_tokens_per_s'] / base:.2f}x")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = {"size": args.size, "device": device.type, "threads": args.threads, "context": args.context, "rows": rows}
    (OUT_DIR / "scheduler.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
