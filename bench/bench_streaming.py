"""Time to first audio and total time of a clone, streamed vs whole, through the real HTTP server.

    .venv/bin/python -m bench.bench_streaming [--size mid] [--seconds 10] [--prompt-seconds 3]
        [--repeats 3] [--threads 2] [--root DIR]

Not a test. One server (``api.loopback``: the production app under uvicorn) on the ``mid`` bundle on CPU
(``full`` in bf16 on CUDA when a GPU is present); the generation is capped at the ids of
``--seconds`` of audio (random weights rarely stop by themselves). Each repeat sends the same
clone (same seed, a ``--prompt-seconds`` Piper prompt, cached after the warm-up) twice:

* whole: no ``stream_format``: the client gets the audio after the whole generation and vocoding;
* streamed: ``stream_format: "audio"`` (pcm): the streaming vocoder runs while the LLM generates.

Time to first audio = the first response byte of audio; total = the last byte. Targets, in the
same run: streamed first audio <= 25% of the whole request, streamed total <= 1.3x whole; on a
GPU first audio <= 300 ms. Prints a table and writes ``bench/out/streaming.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soundfile as sf
import torch

from api.loopback import LOOPBACK, LoopbackServer
from bench.bench_wav2token import SENTENCES, piper_speech
from bundles import write_bundle
from engine.build import build_engine
from settings import Settings

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / "bench" / "out"
IDS_PER_SECOND = 5 / 0.12  # five mixed codes per 120 ms group
PCM_BYTES_PER_SECOND = 2 * 24000  # a pcm answer: 16-bit mono samples at 24 kHz
TARGET_FIRST_AUDIO_SHARE = 0.25
TARGET_STREAM_OVERHEAD = 1.3
TARGET_GPU_FIRST_AUDIO_S = 0.3


def timed_request(client: httpx.Client, payload: dict) -> dict[str, float]:
    """One speech request; seconds to the first and the last audio byte, and the bytes received."""
    t0 = time.perf_counter()
    first = None
    size = 0
    with client.stream("POST", "/v1/audio/speech", json=payload) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.read().decode()}")
        for chunk in r.iter_bytes():
            if chunk and first is None:
                first = time.perf_counter() - t0
            size += len(chunk)
    total = time.perf_counter() - t0
    return {"first_audio_s": first if first is not None else total, "total_s": total, "bytes": size}


def run_clients(url: str, bodies: list[dict], clients: int) -> dict[str, float]:
    """``bodies`` sent by ``clients`` concurrent clients, each sending its next one when answered.

    Throughput = audio seconds delivered / wall seconds; latency = request to last byte, first
    audio = request to first byte (p50 and p99 of each over the requests).
    """
    queue = list(bodies)
    results: list[dict[str, float]] = []

    def client_loop(_: int) -> None:
        with httpx.Client(base_url=url, timeout=3600) as c:
            while queue:
                try:
                    body = queue.pop(0)
                except IndexError:
                    return
                results.append(timed_request(c, body))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    wall = time.perf_counter() - start
    latencies = sorted(r["total_s"] for r in results)
    firsts = sorted(r["first_audio_s"] for r in results)
    audio_s = sum(r["bytes"] for r in results) / PCM_BYTES_PER_SECOND
    return {
        "requests": float(len(results)),
        "wall_s": wall,
        "audio_s": audio_s,
        "throughput": audio_s / wall,
        "requests_per_s": len(results) / wall,
        "latency_p50_s": statistics.median(latencies),
        "latency_p99_s": float(np.percentile(latencies, 99)),
        "first_audio_p50_s": statistics.median(firsts),
        "first_audio_p99_s": float(np.percentile(firsts, 99)),
    }


def server_setup(size: str | None, root: Path, threads: int, **settings: Any) -> tuple[str, bool, Settings]:
    """(bundle size, CUDA?, server settings) of a serving benchmark: ``size`` defaults to mid on CPU
    and full (bf16) on CUDA; the bundle's LLM never stops before its cap, so a request generates
    exactly the audio it is capped at."""
    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    size = size or ("full" if cuda else "mid")
    bundle = write_bundle(root / f"{size}-no-eos", size=size, seed=0, eos=False)
    return (
        size,
        cuda,
        Settings(
            api_host=LOOPBACK,
            model_path=bundle,
            cache_dir=root / f"cache-{size}",
            device="cuda" if cuda else "cpu",
            torch_dtype="bfloat16" if cuda else "float32",
            **settings,
        ),
    )


def prompt_wav_base64(seconds: float) -> str:
    """``seconds`` of Piper speech as a base64 WAV (the clone prompt of the serving benchmarks)."""
    wav, sr = piper_speech(seconds)
    buf = io.BytesIO()
    sf.write(buf, wav[0], sr, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def max_ids_for(seconds: float) -> int:
    """Generated ids (whole groups of 5) that make ``seconds`` of audio."""
    return math.ceil(seconds * IDS_PER_SECOND / 5) * 5


def _request(client: httpx.Client, body: dict, *, stream: bool) -> dict[str, float]:
    return timed_request(client, {**body, "stream_format": "audio"} if stream else body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default=None, help="bundle size (default: mid on CPU, full on CUDA)")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio to generate per request")
    parser.add_argument("--prompt-seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", type=Path, default=OUT_DIR / "bundles")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    size, cuda, settings = server_setup(args.size, args.root, args.threads)
    prompt = prompt_wav_base64(args.prompt_seconds)
    max_ids = max_ids_for(args.seconds)
    body = {
        "input": " ".join(SENTENCES[:2]),
        "response_format": "pcm",
        "step_audio": {
            "prompt_text": SENTENCES[0],
            "prompt_audio_base64": prompt,
            "seed": 1234,
        },
    }
    runs: dict[str, list[dict[str, float]]] = {"whole": [], "streamed": []}
    server = LoopbackServer(
        settings, engine_factory=partial(build_engine, max_new_tokens=max_ids), ready_timeout_s=1800
    )
    with server, httpx.Client(base_url=server.url, timeout=3600) as c:
        _request(c, body, stream=False)  # warm-up: prompt tokens cached, lazy inits done
        for _ in range(args.repeats):
            runs["whole"].append(_request(c, body, stream=False))
            runs["streamed"].append(_request(c, body, stream=True))
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("first_audio_s", "total_s")} for k, v in runs.items()}
    audio_s = statistics.median(r["bytes"] for r in runs["whole"]) / PCM_BYTES_PER_SECOND
    share = med["streamed"]["first_audio_s"] / med["whole"]["total_s"]
    overhead = med["streamed"]["total_s"] / med["whole"]["total_s"]
    result = {
        "size": size,
        "device": "cuda" if cuda else "cpu",
        "threads": args.threads,
        "audio_seconds": audio_s,
        "max_new_tokens": max_ids,
        "runs": runs,
        "median": med,
        "first_audio_share": share,
        "stream_total_ratio": overhead,
        "targets_met": {
            "first_audio_share": share <= TARGET_FIRST_AUDIO_SHARE,
            "stream_total_ratio": overhead <= TARGET_STREAM_OVERHEAD,
            **({"gpu_first_audio": med["streamed"]["first_audio_s"] <= TARGET_GPU_FIRST_AUDIO_S} if cuda else {}),
        },
    }
    print(f"\n{size} bundle on {'CUDA' if cuda else 'CPU'}, {audio_s:.1f} s of audio, median of {args.repeats}")
    print(f"{'':10} {'first audio':>12} {'total':>10}")
    for k in ("whole", "streamed"):
        print(f"{k:10} {med[k]['first_audio_s']:>11.2f}s {med[k]['total_s']:>9.2f}s")
    print(f"first audio (streamed) / whole request = {share:.1%} (target <= {TARGET_FIRST_AUDIO_SHARE:.0%})")
    print(f"streamed total / whole request = {overhead:.2f}x (target <= {TARGET_STREAM_OVERHEAD}x)")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "streaming.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
