"""Step1 decode speed: tokens/s per size and batch, and the per-step cost against context length.

    .venv/bin/python -m bench.bench_llm [--threads 2] [--steps 16] [--context 300]
        [--full-layers 0,4 | --full-layers 32] [--skip-full-cpu] [--root DIR]

Not a test. Three parts, all greedy decoding with our model and a transformers DynamicCache:

* **tiny / mid on CPU** (fp32): the bundles written by ``bundles.llm_bundle`` and loaded by
  ``model_loader.load_llm``; a prompt of ``--context`` ids is prefilled, then ``--steps`` single
  token steps are timed one by one (median). Batch 8 uses left-padded prompts of different
  lengths, as batched requests do. tokens/s = batch / step time.
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
from transformers import DynamicCache

from audio_codes import AUDIO_ID_OFFSET, N_MIXED_CODES
from bundles.llm_bundle import llm_config_dict, write_llm_bundle
from llm.config import Step1Config
from llm.model import Step1ForCausalLM
from model_files import EDITX_DIR
from model_loader import enable_tf32, load_llm

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / "bench" / "out"
AUDIO_IDS = (AUDIO_ID_OFFSET, AUDIO_ID_OFFSET + N_MIXED_CODES)
CONTEXTS = (256, 512, 1024, 2048)
REFERENCE_STEP_S = {256: 0.68, 512: 1.06, 1024: 4.8, 2048: 20.2}  # the reference (bench/README.md), fp32, 2 threads
TARGET_STEP_S = 0.7


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bundle(root: Path, size: str, device: torch.device) -> Path:
    """The ``size`` bundle under ``root/size`` (written once, reused)."""
    editx = root / size / EDITX_DIR
    if not (editx / "config.json").is_file():
        logger.info("Writing the %s LLM bundle under %s", size, root / size)
        write_llm_bundle(root / size, size=size, seed=0, device=device)
    return editx


def _left_padded_prompts(batch: int, context: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` audio-id prompts, row r shorter by 7r tokens, left-padded to ``context``."""
    gen = torch.Generator().manual_seed(batch * 1000 + context)
    ids = torch.randint(*AUDIO_IDS, (batch, context), generator=gen)
    mask = torch.ones(batch, context, dtype=torch.long)
    for row in range(batch):
        pad = min(7 * row, context - 1)
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def decode_speed(model: torch.nn.Module, batch: int, context: int, steps: int) -> dict[str, float]:
    """Prefill ``context`` ids then time ``steps`` greedy single-token steps (median)."""
    device = next(model.parameters()).device
    ids, mask = _left_padded_prompts(batch, context, device)
    cache = DynamicCache()
    _sync(device)
    begin = time.perf_counter()
    logits = model(ids, attention_mask=mask if batch > 1 else None, cache=cache, logits_to_keep=1).logits
    _sync(device)
    prefill_s = time.perf_counter() - begin
    times = []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)
        if batch > 1:
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        _sync(device)
        begin = time.perf_counter()
        logits = model(token, attention_mask=mask if batch > 1 else None, cache=cache).logits
        _sync(device)
        times.append(time.perf_counter() - begin)
    step = statistics.median(times[1:] if len(times) > 2 else times)
    return {"prefill_s": prefill_s, "step_s": step, "tokens_per_s": batch / step}


def _full_width_model(layers: int) -> Step1ForCausalLM:
    """The official-width Step1 with ``layers`` layers, random fp32 weights, on CPU."""
    config = Step1Config(**{**llm_config_dict("full"), "num_hidden_layers": layers})
    torch.manual_seed(0)
    return Step1ForCausalLM(config).eval()


def _filled_cache(config: Step1Config, layers: int, context: int) -> DynamicCache:
    cache = DynamicCache()
    shape = (1, config.num_attention_groups, context, config.head_dim)
    for layer in range(layers):
        cache.update(torch.randn(shape), torch.randn(shape), layer)
    return cache


@torch.inference_mode()
def step_vs_context(model: Step1ForCausalLM, contexts: tuple[int, ...], repeats: int = 7) -> dict[int, float]:
    """Fastest of ``repeats`` decode steps with a KV cache of each context length (batch 1).

    The minimum, not the median: on a shared machine the slower runs measure the neighbours.
    """
    layers = len(model.model.layers)
    token = torch.tensor([[AUDIO_IDS[0] + 7]])
    out = {}
    for context in contexts:
        cache = _filled_cache(model.config, layers, context)
        times = []
        for _ in range(repeats + 1):
            begin = time.perf_counter()
            model(token, cache=cache)
            times.append(time.perf_counter() - begin)
            cache.crop(-1)  # back to `context` keys
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
    print(f"{'size':6} {'device':6} {'dtype':9} {'batch':>5} {'prefill s':>10} {'step ms':>9} {'tokens/s':>9}")
    for r in rows:
        print(
            f"{r['size']:6} {r['device']:6} {r['dtype']:9} {r['batch']:5d} {r['prefill_s']:10.3f} "
            f"{1000 * r['step_s']:9.1f} {r['tokens_per_s']:9.1f}"
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
