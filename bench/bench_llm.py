"""Step1 decode speed: tokens/s per size and batch, and the per-step cost against context length.

    .venv/bin/python -m bench.bench_llm [--threads 2] [--steps 16] [--context 300]
        [--full-layers 0,4 | --full-layers 32] [--skip-full-cpu] [--root DIR]

Not a test. Three parts, all greedy decoding with our model, through the server's decode loop
(``llm.scheduler.Scheduler`` timed by ``bench.decode_timing``) or its forward call on its cache:

* **tiny / mid on CPU** (fp32): the bundles written by ``bundles.llm_bundle`` and loaded by
  ``model_loader.load_llm``; ``batch`` prompts of about ``--context`` ids (different lengths, as
  batched requests are) decode ``--steps`` ids together; the step time is the median step while
  the whole batch runs (sampling and bookkeeping included), tokens/s = batch / step time. The
  model-only step (one forward on the same ``RowKVCache``) shows what the loop adds.
* **full size on CPU, per decode step at contexts 256/512/1024/2048** (fp32, the contexts of
  the reference's row in bench/README.md): the context is a KV cache of that length (random keys/values cost what real
  ones cost) and each step is one token. The full model is 14 GB in fp32, so by default the
  official-width model is built with 0 and 4 layers (same embedding, final norm and head) and the
  32-layer step is extrapolated: ``step(32) = step(0) + 8 * (step(4) - step(0))``. Each figure is
  the fastest of 7 steps. ``--full-layers 32`` measures the whole model instead (~15 GB free RAM).
* **full size on CUDA** (bf16, when a GPU is present): the full random bundle, batch 1 and 8.

Prints a table and writes ``bench/out/llm.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.decode_timing import AUDIO_IDS, audio_prompts, time_decode
from bundles.llm_bundle import llm_config_dict, write_llm_bundle
from llm.batching import LastLogits, RowKVCache, model_device, prefill
from llm.config import Step1Config
from llm.model import Step1ForCausalLM
from llm.scheduler import Scheduler
from model_files import EDITX_DIR
from model_loader import enable_tf32, load_llm

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / "bench" / "out"
CONTEXTS = (256, 512, 1024, 2048)
REFERENCE_STEP_S = {256: 0.68, 512: 1.06, 1024: 4.8, 2048: 20.2}  # the reference (bench/README.md), fp32, 2 threads
TARGET_STEP_S = 0.7


def _bundle(root: Path, size: str, device: torch.device) -> Path:
    """The ``size`` bundle under ``root/size`` (written once, reused)."""
    editx = root / size / EDITX_DIR
    if not (editx / "config.json").is_file():
        logger.info("Writing the %s LLM bundle under %s", size, root / size)
        write_llm_bundle(root / size, size=size, seed=0, device=device)
    return editx


def decode_speed(model: torch.nn.Module, batch: int, context: int, steps: int) -> dict[str, float]:
    """Greedy decode of ``batch`` prompts of about ``context`` ids through the server's decode loop.

    ``step_s`` is the median step while the whole batch runs (sampling and bookkeeping included);
    ``model_step_s`` is the forward alone on the same cache, so their gap is the loop's overhead.
    """
    scheduler = Scheduler(model, max_batch_rows=max(2, batch), kv_budget_bytes=2**40)
    try:
        timing = time_decode(scheduler, audio_prompts(batch, context), max_new_tokens=steps)
    finally:
        scheduler.close()
    tokens_per_s = timing.full_batch_tokens_per_s
    return {
        "step_s": batch / tokens_per_s,
        "tokens_per_s": tokens_per_s,
        "model_step_s": model_step_s(model, batch, context, steps),
    }


@torch.inference_mode()
def model_step_s(model: torch.nn.Module, rows: int, context: int, steps: int) -> float:
    """Median seconds of one decode forward of ``rows`` rows (the loop's ``LastLogits`` on its
    ``RowKVCache``), without sampling or bookkeeping."""
    device = model_device(model)
    forward = LastLogits(model)
    _, cache = prefill(model, forward, [p.cond for p in audio_prompts(rows, context)])
    token = torch.full((rows, 1), AUDIO_IDS[0] + 7, dtype=torch.long, device=device)
    times = []
    for _ in range(steps):
        _sync(device)
        begin = time.perf_counter()
        forward(token, cache.mask(1), cache)
        _sync(device)
        times.append(time.perf_counter() - begin)
    return statistics.median(times[1:] if len(times) > 2 else times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _full_width_model(layers: int) -> Step1ForCausalLM:
    """The official-width Step1 with ``layers`` layers, random fp32 weights, on CPU."""
    config = Step1Config(**{**llm_config_dict("full"), "num_hidden_layers": layers})
    torch.manual_seed(0)
    return Step1ForCausalLM(config).eval()


def _filled_cache(config: Step1Config, layers: int, context: int) -> RowKVCache:
    """A one-row cache holding ``context`` random keys and values per layer (they cost what real ones cost)."""
    cache = RowKVCache(layers, 1)
    shape = (1, config.num_attention_groups, context, config.head_dim)
    for layer in range(layers):
        cache.update(torch.randn(shape), torch.randn(shape), layer)
    return cache


@torch.inference_mode()
def step_vs_context(model: Step1ForCausalLM, contexts: tuple[int, ...], repeats: int = 7) -> dict[int, float]:
    """Fastest of ``repeats`` decode forwards (the loop's ``LastLogits`` on its ``RowKVCache``) with a KV
    cache of each context length (batch 1).

    The minimum, not the median: on a shared machine the slower runs measure the neighbours.
    """
    layers = len(model.model.layers)
    forward = LastLogits(model)
    token = torch.tensor([[AUDIO_IDS[0] + 7]])
    out = {}
    for context in contexts:
        times = []
        for _ in range(repeats + 1):
            cache = _filled_cache(model.config, layers, context)
            begin = time.perf_counter()
            forward(token, cache.mask(1), cache)
            times.append(time.perf_counter() - begin)
        out[context] = min(times[1:])
    return out


def full_cpu_steps(layer_counts: list[int], contexts: tuple[int, ...]) -> dict[str, Any]:
    """Per-step seconds at each context for the 32-layer fp32 model (measured or extrapolated)."""
    measured: dict[int, dict[int, float]] = {}
    for layers in layer_counts:
        model = _full_width_model(layers)
        measured[layers] = step_vs_context(model, contexts)
        del model
    if 32 in measured:
        return {"method": "measured, 32 layers", "step_s": measured[32], "by_layers": measured}
    low, high = min(layer_counts), max(layer_counts)
    estimate = {}
    for context in contexts:
        per_layer = (measured[high][context] - measured[low][context]) / (high - low)
        estimate[context] = measured[low][context] + (32 - low) * per_layer
    return {
        "method": f"extrapolated from {low} and {high} official-width layers",
        "step_s": estimate,
        "by_layers": measured,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--full-layers", default="0,4", help="'0,4' (extrapolate) or '32' (whole model)")
    parser.add_argument("--skip-full-cpu", action="store_true")
    parser.add_argument("--root", type=Path, default=OUT_DIR / "llm-bundles")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    results: dict[str, object] = {"threads": args.threads, "context": args.context, "decode": []}

    rows: list[dict[str, Any]] = []
    for size in ("tiny", "mid"):
        model = load_llm(_bundle(args.root, size, cpu), "base", cpu, torch.float32)
        for batch in (1, 8):
            r = decode_speed(model, batch, args.context, args.steps)
            rows.append({"size": size, "device": "cpu", "dtype": "float32", "batch": batch, **r})
        del model
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        enable_tf32()
        model = load_llm(_bundle(args.root, "full", cuda), "base", cuda, torch.bfloat16)
        for batch in (1, 8):
            decode_speed(model, batch, 32, 4)  # warm-up (kernels, allocator)
            r = decode_speed(model, batch, args.context, args.steps)
            rows.append({"size": "full", "device": "cuda", "dtype": "bfloat16", "batch": batch, **r})
        del model
    results["decode"] = rows
    print(f"\nDecode, greedy, context {args.context}, {args.threads} CPU threads")
    print(f"{'size':6} {'device':6} {'dtype':9} {'batch':>5} {'step ms':>9} {'model ms':>9} {'tokens/s':>9}")
    for r in rows:
        print(
            f"{r['size']:6} {r['device']:6} {r['dtype']:9} {r['batch']:5d} {1000 * r['step_s']:9.1f} "
            f"{1000 * r['model_step_s']:9.1f} {r['tokens_per_s']:9.1f}"
        )

    if not args.skip_full_cpu:
        layer_counts = [int(x) for x in args.full_layers.split(",")]
        full = full_cpu_steps(layer_counts, CONTEXTS)
        results["full_cpu_fp32"] = full
        print(f"\nFull-size decode step on CPU, fp32, batch 1 ({full['method']})")
        print(f"{'context':>7} {'ours s':>8} {'reference s':>12} {'target s':>9}")
        for context in CONTEXTS:
            ours = full["step_s"][context]
            print(f"{context:7d} {ours:8.3f} {REFERENCE_STEP_S[context]:12.2f} {TARGET_STEP_S:9.2f}")

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "llm.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
