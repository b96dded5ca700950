"""Long text as fast as one sentence: first audio and total time of a ~2,000-character text.

    .venv/bin/python -m bench.bench_long_text [--size mid] [--seconds 3] [--in-flight 8]
        [--threads 2] [--root DIR]

Not a test. One server (``api.loopback``: the production app under uvicorn, continuous batching)
on the ``mid`` bundle on CPU (``full`` in bf16 on CUDA); its LLM never stops before its cap, so
every segment generates exactly ``--seconds`` of audio. Three measurements on the same server,
every request streamed (``stream_format: "audio"``, pcm) with the same seed:

* **long**: the ~2,000-character English text (20 sentences) in one request: its segments are
  generated side by side (``--in-flight`` at once) and streamed in order;
* **first sentence**: its first sentence alone (the first audio a short request gets);
* **one by one**: the long text's segments as separate requests, one after another, each with
  the seed its segment gets in the long request (what a server that speaks pieces in turn does).

Targets, in the same run: long first audio <= 1.25x the first sentence's first audio; long total
<= 0.5x the one-by-one total. Peak RSS of the process (server and client) is reported. Prints a
table and writes ``bench/out/long_text.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from functools import partial
from pathlib import Path

import httpx

from api.loopback import LoopbackServer
from bench.bench_streaming import OUT_DIR, max_ids_for, prompt_wav_base64, server_setup, timed_request
from engine.build import build_engine

logger = logging.getLogger(__name__)

TARGET_FIRST_AUDIO_RATIO = 1.25
TARGET_TOTAL_RATIO = 0.5
SEED = 2026
TEXT = " ".join(
    [
        "The lighthouse keeper climbed the spiral stairs every evening, long before the sun went down.",
        "He carried a small lamp, a worn leather notebook, and a thermos of sweet black tea that his daughter had"
        " made for him.",
        "From the top he could see the whole bay, the fishing boats, and the lights of the distant town.",
        "On clear nights the stars were so bright that he could read his notes without the lamp.",
        "But tonight the fog rolled in from the sea, thick and grey, and swallowed the harbor whole.",
        "He wound the great clockwork that turned the lens, and the beam swept slowly across the water.",
        "Somewhere out there a ship was waiting for the light, its captain peering anxiously into the mist from"
        " the bridge.",
        "The keeper wrote the time in his notebook, as he had done every night for thirty years.",
        "Then he heard it: the low horn of a freighter, closer than any ship should be on such a night.",
        "He rang the bell twice, then three times, the old signal that meant danger near the rocks.",
        "The horn answered, and the dark shape of the hull turned slowly away from the cliffs.",
        "Relief washed over him like warm water, and he sat down on the wooden bench by the window.",
        "His tea had gone cold, but he drank it anyway, listening to the waves against the stones.",
        "In the morning the fog lifted, and the bay was blue and calm as if nothing had happened.",
        "A letter arrived a week later, written by the captain in careful blue ink, thanking the keeper for the bells.",
        "He pinned it to the wall beside the map, next to the photograph of his late wife.",
        "His daughter laughed when she saw it on her Sunday visit and said that he should really frame it properly.",
        "He said that a letter is meant to be read, not hidden behind glass where nobody touches it.",
        "So the letter stayed on the wall, its corners curling a little more with every winter.",
        "And every evening, long before the sun went down, the keeper climbed the stairs again.",
    ]
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default=None, help="bundle size (default: mid on CPU, full on CUDA)")
    parser.add_argument("--seconds", type=float, default=3.0, help="audio each segment generates (its cap)")
    parser.add_argument("--in-flight", type=int, default=8, help="--segments-in-flight of the server")
    parser.add_argument("--prompt-seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", type=Path, default=OUT_DIR / "bundles")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    size, cuda, settings = server_setup(
        args.size, args.root, args.threads, segments_in_flight=args.in_flight, llm_max_batch_rows=16
    )
    max_ids = max_ids_for(args.seconds)
    prompt = {"prompt_text": "Please call Stella and ask her to bring these things.", "prompt_audio_base64": ""}
    prompt["prompt_audio_base64"] = prompt_wav_base64(args.prompt_seconds)

    def body(text: str, seed: int) -> dict:
        step_audio = {**prompt, "seed": seed}
        return {"input": text, "response_format": "pcm", "stream_format": "audio", "step_audio": step_audio}

    server = LoopbackServer(
        settings, engine_factory=partial(build_engine, max_new_tokens=max_ids), ready_timeout_s=1800
    )
    with server, httpx.Client(base_url=server.url, timeout=7200) as c:
        engine = server.app.state.step_audio.engine
        segments = engine.segments(TEXT)
        first_sentence = TEXT.split(". ")[0] + "."
        timed_request(c, body(first_sentence, SEED))  # warm-up: the prompt's record is cached, kernels warm
        alone = timed_request(c, body(first_sentence, SEED))
        begin = time.perf_counter()
        long = timed_request(c, body(TEXT, SEED))
        long["wall_s"] = time.perf_counter() - begin
        serial = [timed_request(c, body(s.text, SEED + k)) for k, s in enumerate(segments)]
    serial_total = sum(r["total_s"] for r in serial)
    first_ratio = long["first_audio_s"] / alone["first_audio_s"]
    total_ratio = long["total_s"] / serial_total
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    result = {
        "size": size,
        "device": "cuda" if cuda else "cpu",
        "threads": args.threads,
        "characters": len(TEXT),
        "segments": len(segments),
        "segment_audio_s": args.seconds,
        "segments_in_flight": args.in_flight,
        "first_sentence_alone": alone,
        "long": long,
        "one_by_one_total_s": serial_total,
        "one_by_one": serial,
        "first_audio_ratio": first_ratio,
        "total_ratio": total_ratio,
        "peak_rss_gb": peak_rss_gb,
        "targets_met": {
            "first_audio": first_ratio <= TARGET_FIRST_AUDIO_RATIO,
            "total": total_ratio <= TARGET_TOTAL_RATIO,
        },
    }
    print(
        f"\n{size} bundle on {'CUDA' if cuda else 'CPU'}, {len(TEXT)} characters in {len(segments)} segments, "
        f"{args.seconds:g} s of audio each, {args.in_flight} in flight"
    )
    print(f"{'':22} {'first audio':>12} {'total':>10}")
    print(f"{'first sentence alone':22} {alone['first_audio_s']:>11.2f}s {alone['total_s']:>9.2f}s")
    print(f"{'long text':22} {long['first_audio_s']:>11.2f}s {long['total_s']:>9.2f}s")
    print(f"{'segments one by one':22} {serial[0]['first_audio_s']:>11.2f}s {serial_total:>9.2f}s")
    print(f"first audio: long / first sentence = {first_ratio:.2f}x (target <= {TARGET_FIRST_AUDIO_RATIO}x)")
    print(f"total: long / one by one = {total_ratio:.2f}x (target <= {TARGET_TOTAL_RATIO}x)")
    print(f"peak RSS {peak_rss_gb:.2f} GB")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "long_text.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
