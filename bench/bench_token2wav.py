"""Benchmark: non-streaming token2wav on the FULL-size random vocoder (official dimensions).

Measures what bench/README.md lists for the reference: seconds for 3 s and 10 s of target
audio with a 3 s prompt (125 prompt codes, 150 prompt-mel frames), fp32, ``torch`` with 2 CPU
threads, and the peak resident memory of the process. Each case runs in its own subprocess so
``ru_maxrss`` is that case's peak (weights included). On a CUDA machine the same cases also run on
the GPU (peak GPU memory from ``torch.cuda.max_memory_allocated``).

    .venv/bin/python -m bench.bench_token2wav [--root DIR] [--threads 2] [--repeats 3] [--device cpu|cuda|all]

The full-size bundle (~700 MB) is written once under ``--root`` and reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from audio_codes import N_MIXED_CODES, VQ02_CODES, VQ02_PER_GROUP, VQ06_PER_GROUP

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = Path(tempfile.gettempdir()) / "step-audio-bench-vocoder-full"
PROMPT_GROUPS = 25  # 125 mixed codes -> 75 token frames -> 150 mel frames = 3.0 s
CASES = {"3s": 25, "10s": 84}  # target groups: 25 -> 3.0 s, 84 -> 10.08 s
REFERENCE_CPU_S = {"3s": 5.07, "10s": 11.96}  # the reference (bench/README.md), same machine class, 2 threads
# the reference with 1 thread (bench/README.md), 3 s case (wall 9.17 s = process CPU 9.15 s)
REFERENCE_CPU_1THREAD_S = {"3s": 9.17}
REFERENCE_PEAK_GB = 3.8


def _bundle(root: Path) -> Path:
    """The full-size vocoder directory under ``root``, written on first use."""
    from bundles.vocoder_bundle import VOCODER_DIR, write_vocoder_bundle

    vocoder_dir = root / "Step-Audio-EditX" / VOCODER_DIR
    marker = vocoder_dir / ".bench-complete"
    if not marker.is_file():
        start = time.perf_counter()
        write_vocoder_bundle(root / "Step-Audio-EditX", size="full", seed=0)
        marker.write_text("full seed 0\n")
        print(f"wrote the full-size vocoder in {time.perf_counter() - start:.1f} s: {vocoder_dir}", file=sys.stderr)
    return vocoder_dir


def _codes(groups: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return np.concatenate(
        [
            np.concatenate(
                [rng.integers(0, VQ02_CODES, VQ02_PER_GROUP), rng.integers(VQ02_CODES, N_MIXED_CODES, VQ06_PER_GROUP)]
            )
            for _ in range(groups)
        ]
    ).astype(np.int64)


def run_case(vocoder_dir: Path, case: str, device: str, threads: int, repeats: int) -> dict[str, object]:
    """One case in this process: load, one warm-up call, ``repeats`` timed calls."""
    import numpy as np
    import torch

    from vocoder.token2wav import Token2Wav

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    t2w = Token2Wav.from_dir(vocoder_dir, device=device)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompt_codes = _codes(PROMPT_GROUPS, seed=1)
    prompt_mel = (rng.normal(size=(1, 150, 80)) - 5.0).astype(np.float32)
    spk_emb = rng.normal(size=(1, 192)).astype(np.float32)
    codes = _codes(CASES[case], seed=2)

    def once() -> tuple[float, float, float, int, float]:
        if device == "cuda":
            torch.cuda.synchronize()
        cpu_start = time.process_time()
        start = time.perf_counter()
        wav = t2w.token2wav(codes, prompt_codes, prompt_mel, spk_emb, seed=0)
        if device == "cuda":
            torch.cuda.synchronize()
        timings = t2w.last_timings
        assert timings is not None  # set by every token2wav call
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        return wall, timings.flow_s, timings.hift_s, wav.shape[1], cpu

    once()  # warm-up: first-call allocations and kernel selection
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = [once() for _ in range(repeats)]
    totals = [r[0] for r in runs]
    result: dict[str, object] = {
        "case": case,
        "device": device,
        "threads": threads,
        "audio_s": runs[0][3] / t2w.sample_rate,
        "load_s": round(load_s, 2),
        "median_s": round(statistics.median(totals), 3),
        "best_s": round(min(totals), 3),
        "flow_s": round(statistics.median(r[1] for r in runs), 3),
        "hift_s": round(statistics.median(r[2] for r in runs), 3),
        # process CPU seconds per call (all threads). With 1 thread this hardly depends on other load;
        # with more, OpenMP threads spin while waiting for a descheduled partner, so it inflates too.
        "cpu_s": round(statistics.median(r[4] for r in runs), 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
    }
    if device == "cuda":
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
        result["gpu"] = torch.cuda.get_device_name()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where the full-size bundle lives")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--child", nargs=2, metavar=("CASE", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    vocoder_dir = _bundle(args.root)
    if args.child:
        print(json.dumps(run_case(vocoder_dir, args.child[0], args.child[1], args.threads, args.repeats)))
        return 0

    devices = ["cpu"]
    if args.device in {"cuda", "all"}:
        import torch

        if torch.cuda.is_available():
            devices = ["cuda"] if args.device == "cuda" else ["cpu", "cuda"]
        elif args.device == "cuda":
            print("no CUDA device available", file=sys.stderr)
            return 1
    results = []
    for device in devices:
        for case in args.cases:
            cmd = [
                sys.executable,
                "-m",
                "bench.bench_token2wav",
                "--root",
                str(args.root),
                "--threads",
                str(args.threads),
                "--repeats",
                str(args.repeats),
                "--child",
                case,
                device,
            ]
            out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
            if out.returncode:
                print(out.stderr, file=sys.stderr)
                return out.returncode
            result = json.loads(out.stdout.strip().splitlines()[-1])
            reference = REFERENCE_CPU_1THREAD_S if args.threads == 1 else REFERENCE_CPU_S
            if device == "cpu" and args.threads in {1, 2} and case in reference:
                result["reference_s"] = reference[case]
                result["speedup_vs_reference"] = round(reference[case] / float(result["median_s"]), 2)
                if args.threads == 1:
                    result["cpu_speedup_vs_reference"] = round(reference[case] / float(result["cpu_s"]), 2)
            results.append(result)
            print(json.dumps(result), flush=True)
    print(
        f"reference (bench/README.md): 3 s -> {REFERENCE_CPU_S['3s']} s, 10 s -> {REFERENCE_CPU_S['10s']} s, "
        f"peak RSS {REFERENCE_PEAK_GB} GB",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
