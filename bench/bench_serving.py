"""Serving many clients: throughput, latency and time to first audio at 1, 2, 4 and 8 concurrent clients.

    .venv/bin/python -m bench.bench_serving [--size mid] [--seconds 3] [--requests 8]
        [--clients 1,2,4,8] [--whole] [--threads 2] [--root DIR]

Not a test. One server (``api.loopback``: the production app under uvicorn, with continuous
batching) on the ``mid`` bundle on CPU (``full`` in bf16 on CUDA); the LLM never stops before
its cap (``eos=False``), so every request generates exactly ``--seconds`` of audio. For each
client count, the same ``--requests`` clone requests (distinct seeds, one cached prompt) are
shared by that many clients, each sending its next one when the last is answered; 1 client is
the serial baseline. Requests stream (``stream_format: "audio"``, pcm) unless ``--whole``.

Per level: throughput = audio seconds delivered / wall seconds; latency = request to last byte
(p50, p99); time to first audio = request to first byte; decode steps shared (from the server's
``step_audio_llm_batch_size`` histogram). Targets, in the same run: 8 clients >= 3x the serial
throughput, with p99 latency <= 1.5x the serial p99. Prints a table and writes
``bench/out/serving.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from functools import partial
from pathlib import Path

import httpx

from api.loopback import LoopbackServer
from bench.bench_streaming import max_ids_for, prompt_wav_base64, run_clients, server_setup, timed_request
from bench.bench_wav2token import SENTENCES
from engine.build import build_engine

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / "bench" / "out"
TARGET_THROUGHPUT_GAIN = 3.0
TARGET_P99_RATIO = 1.5


def _steps(client: httpx.Client) -> tuple[float, float]:
    """(decode steps, steps that served one request alone) so far."""
    text = client.get("/metrics").text
    count = re.search(r'^step_audio_llm_batch_size_count\{variant="base"\} (\S+)$', text, flags=re.M)
    alone = re.search(r'^step_audio_llm_batch_size_bucket\{le="1.0",variant="base"\} (\S+)$', text, flags=re.M)
    return (float(count.group(1)), float(alone.group(1))) if count and alone else (0.0, 0.0)


def _level(url: str, bodies: list[dict], clients: int) -> dict[str, float]:
    """The ``bodies`` sent by ``clients`` concurrent clients, and the decode steps they shared."""
    with httpx.Client(base_url=url, timeout=60) as c:
        steps0, alone0 = _steps(c)
        row = run_clients(url, bodies, clients)
        steps1, alone1 = _steps(c)
    steps = steps1 - steps0
    return {
        "clients": float(clients),
        **row,
        "decode_steps": steps,
        "shared_step_share": (steps - (alone1 - alone0)) / steps if steps else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--size", default=None, help="bundle size (default: mid on CPU, full on CUDA)")
    parser.add_argument("--seconds", type=float, default=3.0, help="audio per request")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--whole", action="store_true", help="whole answers instead of streams")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", type=Path, default=OUT_DIR / "bundles")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    levels = [int(c) for c in args.clients.split(",")]
    size, cuda, settings = server_setup(
        args.size, args.root, args.threads, inference_workers=max(levels), queue_size=max(levels) + args.requests
    )
    prompt = prompt_wav_base64(3.0)
    max_ids = max_ids_for(args.seconds)

    def body(seed: int) -> dict:
        step = {"prompt_text": SENTENCES[0], "prompt_audio_base64": prompt, "seed": seed}
        out = {"input": SENTENCES[1], "response_format": "pcm", "step_audio": step}
        return out if args.whole else {**out, "stream_format": "audio"}

    report: dict[str, object] = {"size": size, "device": "cuda" if cuda else "cpu", "threads": args.threads}
    rows = []
    server = LoopbackServer(
        settings, engine_factory=partial(build_engine, max_new_tokens=max_ids), ready_timeout_s=1800
    )
    with server:
        with httpx.Client(base_url=server.url, timeout=3600) as c:
            timed_request(c, body(0))  # warm-up: the prompt's tokens are cached, lazy inits done
        for clients in levels:
            rows.append(_level(server.url, [body(100 + i) for i in range(args.requests)], clients))
            logger.warning("level %d clients done: %s", clients, rows[-1])
    serial = rows[0]
    print(
        f"\n{size} bundle on {'CUDA' if cuda else 'CPU'}, {args.requests} requests of {args.seconds:g} s audio, "
        f"{'whole' if args.whole else 'streamed'}"
    )
    print(
        f"{'clients':>7} {'audio s/s':>10} {'x serial':>9} {'p50 s':>7} {'p99 s':>7} {'first p50':>10} "
        f"{'first p99':>10} {'shared steps':>13}"
    )
    for r in rows:
        gain = r["throughput"] / serial["throughput"]
        print(
            f"{int(r['clients']):>7} {r['throughput']:>10.3f} {gain:>8.2f}x {r['latency_p50_s']:>7.2f} "
            f"{r['latency_p99_s']:>7.2f} {r['first_audio_p50_s']:>10.2f} {r['first_audio_p99_s']:>10.2f} "
            f"{r['shared_step_share']:>12.0%}"
        )
    top = rows[-1]
    gain = top["throughput"] / serial["throughput"]
    p99 = top["latency_p99_s"] / serial["latency_p99_s"]
    print(
        f"{int(top['clients'])} clients: {gain:.2f}x the serial throughput (target >= {TARGET_THROUGHPUT_GAIN}x), "
        f"p99 latency {p99:.2f}x the serial p99 (target <= {TARGET_P99_RATIO}x)"
    )
    report.update(
        levels=rows,
        throughput_gain=gain,
        p99_ratio=p99,
        max_new_tokens=max_ids,
        streamed=not args.whole,
        targets_met={"throughput": gain >= TARGET_THROUGHPUT_GAIN, "p99": p99 <= TARGET_P99_RATIO},
    )
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / f"serving{'-whole' if args.whole else ''}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
