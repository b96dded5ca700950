"""Decode throughput through the continuous-batching scheduler: batch 1 against batch 8.

    .venv/bin/python -m bench.bench_scheduler [--size mid] [--threads 2] [--context 300] [--tokens 48]

Not a test. Loads the ``--size`` bundle written by ``bundles.llm_bundle`` (fp32 on CPU; the full
bundle in bf16 on CUDA when a GPU is present and ``--size full``), then for each batch size submits
that many greedy requests of ``--context`` audio ids (different lengths, as real requests are) to
an ``engine.scheduler.Scheduler`` and times its decode steps as its observer sees them. The first
request holds the loop in its first step until all are queued, so the batch is full from step 2.
Reported per batch: decode tokens/s while the whole batch runs (requests / median step seconds,
the median as ``bench.bench_llm`` takes it, robust on a shared machine), tokens/s over every step
(ids / total step seconds, prefill excluded), and the bare model's rate at that batch from
``bench.bench_llm.decode_speed`` (one DynamicCache, no scheduler) for the scheduler's overhead.
Batch ``8g`` is 8 guided requests (intensity 2: 16 rows).

Writes ``bench/out/scheduler.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time
from pathlib import Path

import torch

from bench.bench_llm import AUDIO_IDS, OUT_DIR, _bundle, decode_speed
from engine.scheduler import Scheduler, StepStats
from llm.prompts import PromptPair
from model_loader import enable_tf32, load_llm

logger = logging.getLogger(__name__)


class _Steps:
    def __init__(self) -> None:
        self.steps: list[StepStats] = []

    def on_admit(self, variant: str, queue_wait_s: float) -> None:
        pass

    def on_step(self, variant: str, stats: StepStats) -> None:
        self.steps.append(stats)


def _prompts(batch: int, context: int) -> list[PromptPair]:
    """``batch`` audio-id prompts, prompt r shorter by 7r ids; the uncond row is the prompt's last half."""
    gen = torch.Generator().manual_seed(batch * 1000 + context)
    out = []
    for row in range(batch):
        ids = torch.randint(*AUDIO_IDS, (context - 7 * row,), generator=gen).tolist()
        out.append(PromptPair(cond=ids, uncond=ids[len(ids) // 2 :]))
    return out


def through_scheduler(model: torch.nn.Module, batch: int, context: int, tokens: int, intensity: float) -> dict:
    """Decode rates of ``batch`` greedy requests of ``tokens`` ids sharing one scheduler."""
    observer = _Steps()
    sched = Scheduler(model, max_batch_rows=2 * batch, kv_budget_bytes=2**40, observer=observer)
    gate = threading.Event()

    def hold(_ids: object) -> None:  # the first request waits for the others to be queued
        gate.wait()

    try:
        prompts = _prompts(batch, context)
        start = time.perf_counter()
        handles = [
            sched.submit(
                prompts[0],
                max_new_tokens=tokens,
                do_sample=False,
                intensity=intensity,
                on_ids=hold,
            )
        ]
        handles += [sched.submit(p, max_new_tokens=tokens, do_sample=False, intensity=intensity) for p in prompts[1:]]
        gate.set()
        produced = sum(len(h.result(600).token_ids) for h in handles)
        wall = time.perf_counter() - start
    finally:
        sched.close()
    full = [s for s in observer.steps[1:] if s.requests == batch][1:]  # skip the gated step and the first full one
    every = observer.steps[1:]
    return {
        "batch": batch,
        "rows": batch * (2 if intensity != 1.0 else 1),
        "ids": produced,
        "wall_s": wall,
        "steps": len(observer.steps),
        "full_batch_tokens_per_s": batch / statistics.median(s.seconds for s in full),
        "all_steps_tokens_per_s": sum(s.requests for s in every) / max(sum(s.seconds for s in every), 1e-9),
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
    through_scheduler(model, 2, 64, 4, 1.0)  # warm-up
    rows = []
    for batch, intensity in ((1, 1.0), (8, 1.0), (8, 2.0)):
        r = through_scheduler(model, batch, args.context, args.tokens, intensity)
        r["bare_model_tokens_per_s"] = decode_speed(model, r["rows"], args.context, 16)["tokens_per_s"] / (
            r["rows"] // batch
        )
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
