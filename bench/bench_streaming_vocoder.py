"""Benchmark: the streaming vocoder session vs whole-utterance token2wav, FULL-size random vocoder.

~10 s of target codes (84 groups) with a 3 s prompt (125 prompt codes, 150 prompt-mel frames), as
``bench_token2wav`` uses. The codes are fed one 5-code group per call as fast as the session takes
them (no LLM in the loop), so the numbers are the vocoder's own share of streaming latency:

* ``first_piece_s``: from opening the session to the first audio piece (setup + chunk 0, which
  needs 30 codes: 25 + one look-ahead group);
* ``stream_total_s``: until ``finish()`` has returned the last piece;
* ``whole_s``: one ``Token2Wav.token2wav`` call on the same codes;
* per-chunk seconds (flow + HiFT), the setup's included in the first.

Process CPU seconds are reported beside wall time: on a shared machine they move less. Prints
one JSON line and writes it to ``bench/out/streaming_vocoder_<device>.json`` (git-ignored).

    .venv/bin/python -m bench.bench_streaming_vocoder [--root DIR] [--threads 2] [--repeats 3] [--device cpu|cuda]

:func:`stream_timings` is the hook ``bench/bench_streaming.py`` (LLM + vocoder) can reuse.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.bench_token2wav import DEFAULT_ROOT, PROMPT_GROUPS, _bundle, _codes
from vocoder.stream import Token2WavStream

if TYPE_CHECKING:
    import numpy as np

    from vocoder.token2wav import Token2Wav

OUT_DIR = Path(__file__).resolve().parent / "out"
TARGET_GROUPS = 84  # 252 token frames -> 504 mel frames = 10.08 s
FEED = 5  # codes per call: one LLM group


@dataclass(frozen=True)
class StreamTimings:
    """Seconds (wall and process CPU) from opening a session to its first piece and to its end."""

    first_piece_s: float
    first_piece_cpu_s: float
    stream_total_s: float
    stream_total_cpu_s: float
    chunk_s: list[float]  # wall seconds between consecutive chunks (the first includes the setup)
    samples: int


def stream_timings(
    t2w: Token2Wav,
    codes: np.ndarray,
    prompt: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    seed: int = 0,
    feed: int = FEED,
    synchronize: bool = False,
) -> StreamTimings:
    """Stream ``codes`` through a session in ``feed``-code calls; wall/CPU seconds to the first piece and in total."""
    import torch

    def sync() -> None:
        if synchronize:
            torch.cuda.synchronize()

    sync()
    cpu0, t0 = time.process_time(), time.perf_counter()
    first_s: float | None = None
    first_cpu_s: float | None = None
    chunk_s: list[float] = []
    samples = 0
    last = t0
    with Token2WavStream(t2w, *prompt, seed=seed) as session:
        for i in range(0, len(codes), feed):
            pieces = session.feed(codes[i : i + feed])
            if pieces:
                sync()
                now = time.perf_counter()
                chunk_s.append(now - last)
                last = now
                samples += sum(p.size for p in pieces)
                if first_s is None:
                    first_s, first_cpu_s = now - t0, time.process_time() - cpu0
        pieces = session.finish()
        sync()
        now = time.perf_counter()
        chunk_s.append(now - last)
        samples += sum(p.size for p in pieces)
        if first_s is None:
            first_s, first_cpu_s = now - t0, time.process_time() - cpu0
    assert first_s is not None and first_cpu_s is not None
    return StreamTimings(
        first_piece_s=first_s,
        first_piece_cpu_s=first_cpu_s,
        stream_total_s=now - t0,
        stream_total_cpu_s=time.process_time() - cpu0,
        chunk_s=[round(s, 3) for s in chunk_s],
        samples=samples,
    )


def run(vocoder_dir: Path, device: str, threads: int, repeats: int) -> dict[str, object]:
    import numpy as np
    import torch

    from vocoder.token2wav import Token2Wav

    torch.set_num_threads(threads)
    t2w = Token2Wav.from_dir(vocoder_dir, device=device)
    rng = np.random.default_rng(0)
    prompt = (
        _codes(PROMPT_GROUPS, seed=1),
        (rng.normal(size=(1, 150, 80)) - 5.0).astype(np.float32),
        rng.normal(size=(1, 192)).astype(np.float32),
    )
    codes = _codes(TARGET_GROUPS, seed=2)
    cuda = device == "cuda"

    def whole() -> tuple[float, float]:
        if cuda:
            torch.cuda.synchronize()
        cpu0, t0 = time.process_time(), time.perf_counter()
        t2w.token2wav(codes, *prompt, seed=0)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - cpu0

    # warm-up: both paths once on a short input (allocations, kernel selection)
    t2w.token2wav(codes[:50], *prompt, seed=0)
    stream_timings(t2w, codes[:50], prompt, synchronize=cuda)
    wholes, streams = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine load
        wholes.append(whole())
        streams.append(stream_timings(t2w, codes, prompt, synchronize=cuda))
    med = statistics.median
    whole_s, whole_cpu = med(w[0] for w in wholes), med(w[1] for w in wholes)
    first_s, total_s = med(s.first_piece_s for s in streams), med(s.stream_total_s for s in streams)
    first_cpu = med(s.first_piece_cpu_s for s in streams)
    total_cpu = med(s.stream_total_cpu_s for s in streams)
    return {
        "device": device if not cuda else torch.cuda.get_device_name(),
        "threads": threads,
        "repeats": repeats,
        "audio_s": streams[0].samples / t2w.sample_rate,
        "whole_s": round(whole_s, 3),
        "first_piece_s": round(first_s, 3),
        "stream_total_s": round(total_s, 3),
        "first_piece_over_whole": round(first_s / whole_s, 3),
        "stream_total_over_whole": round(total_s / whole_s, 3),
        "whole_cpu_s": round(whole_cpu, 3),
        "first_piece_cpu_s": round(first_cpu, 3),
        "stream_total_cpu_s": round(total_cpu, 3),
        "chunk_s": streams[len(streams) // 2].chunk_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where the full-size bundle lives")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device available", file=sys.stderr)
            return 1
    result = run(_bundle(args.root), args.device, args.threads, args.repeats)
    print(json.dumps(result), flush=True)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / f"streaming_vocoder_{args.device}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
