"""Validate a GPU host in one command: every variant and mode through the real server, with its numbers.

    .venv/bin/python -m bench.gpu_check                          # CUDA: full-size bundle, base awq bnb
    .venv/bin/python -m bench.gpu_check --device cpu --size tiny # the same flow on CPU (CI)
        [--variants base,awq,bnb] [--root DIR] [--out FILE] [--max-new-tokens N]

Not a test and not a benchmark of one stage: an operator's acceptance run. It writes (once, then
reuses) a random-weight bundle of the official dimensions with the AWQ and bnb variants, then for
each variant starts the real server (``api.create_app`` under uvicorn on loopback, in this
process, so the GPU memory counters are the server's) and drives it over HTTP only: clone and
every edit mode, each whole and streamed (``stream_format: audio``), 8 concurrent clones, and a
decode measurement of the server's own decode loop at batch 1 and 8. The bundle's LLM never emits EOS
(``bundles.llm_bundle``, ``eos=False``), so every generation is exactly ``--max-new-tokens`` long:
420 tokens, 10.08 s of audio, at full size.

Without CUDA (and without ``--device cpu``) it says so and exits 0, so CI can run it anywhere.
Exit status 1 on any failure: a variant that does not load, a non-200 answer, audio that does not
decode. The speed targets are reported against their figures, never turned into a failure: they
say how fast the host is, not whether it works.

Prints a table and writes ``bench/out/gpu_check.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import torch

if TYPE_CHECKING:
    from llm.scheduler import Scheduler

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / "bench" / "out"
VOICE_WAV = REPO_ROOT / "engine" / "default_voice" / "voice.wav"
VOICE_TEXT = (REPO_ROOT / "engine" / "default_voice" / "transcript.txt").read_text().strip()
NO_CUDA_MESSAGE = (
    "gpu-check: no CUDA device is available here, so there is nothing to check "
    "(run it on the GPU host; '--device cpu --size tiny' runs the same flow on CPU)."
)

TEXT = "The quick brown fox jumps over the lazy dog, and the server reads it back in the cloned voice."
# (mode, edit_info, input text); edit_info values are the catalogue's (GET /v1/tags)
EDITS: tuple[tuple[str, str | None, str], ...] = (
    ("emotion", "happy", ""),
    ("style", "whisper", ""),
    ("speed", "faster", ""),
    ("paralinguistic", None, "Hello, I am [Laughter] the default voice of this speech server."),
    ("denoise", None, ""),
    ("vad", None, ""),
)
CONCURRENT_CLIENTS = 8
DECODE_BATCHES = (1, 8)
DECODE_CONTEXT = 300  # prompt ids before decoding: about a clone prompt with a few seconds of speech
REQUEST_TIMEOUT_S = 900.0
LOAD_TIMEOUT_S = 1800.0  # a full-size variant loads in well under a minute on a GPU; quantised ones take longer
SIZE_DEFAULTS = {
    "full": {"max_new_tokens": 420, "decode_steps": 128},
    "tiny": {"max_new_tokens": 25, "decode_steps": 16},
}
TARGETS = {  # what a GPU host should reach at full size (reported, not enforced)
    "decode_tokens_per_s_batch1": (">=", 150.0),
    "rtf_clone": ("<=", 0.3),
    "first_audio_s": ("<=", 0.3),
}

logger = logging.getLogger("gpu_check")


@dataclass
class RequestResult:
    """One HTTP request: what came back and how long it took (client side, loopback)."""

    mode: str
    streamed: bool
    status: int
    seconds: float = 0.0  # request sent -> last byte
    first_audio_s: float | None = None  # request sent -> first byte of audio (past the WAV header)
    audio_s: float = 0.0
    audio_tokens: int | None = None  # whole answers say it in a header; a stream cannot know it up front
    error: str | None = None

    @property
    def rtf(self) -> float | None:
        return self.seconds / self.audio_s if self.audio_s > 0 else None


@dataclass
class VariantReport:
    """Everything measured for one LLM variant, and every failure met."""

    variant: str
    load_s: float | None = None
    requests: list[RequestResult] = field(default_factory=list)
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)  # batch -> tokens/s, all rows together
    serving: dict[str, float] = field(default_factory=dict)
    gpu_memory_after_load_gb: float | None = None
    peak_gpu_memory_gb: float | None = None
    failures: list[str] = field(default_factory=list)

    def clone(self, streamed: bool) -> RequestResult | None:
        return next((r for r in self.requests if r.mode == "clone" and r.streamed is streamed), None)


# --- requests -------------------------------------------------------------------------------------


def speech_body(mode: str, variant: str, voice_b64: str, seed: int, streamed: bool) -> dict[str, Any]:
    """The JSON body of one /v1/audio/speech request of ``mode`` (clone or an edit) for ``variant``."""
    step: dict[str, Any] = {"mode": mode, "model_variant": variant, "seed": seed}
    if mode == "clone":
        text = TEXT
        step.update(prompt_text=VOICE_TEXT, prompt_audio_base64=voice_b64)
    else:
        _, edit_info, text = next(e for e in EDITS if e[0] == mode)
        step.update(input_audio_base64=voice_b64, audio_text=VOICE_TEXT)
        if edit_info:
            step["edit_info"] = edit_info
    body: dict[str, Any] = {"model": "step-audio-editx", "input": text, "response_format": "wav", "step_audio": step}
    if streamed:
        body["stream_format"] = "audio"
    return body


def run_request(http: httpx.Client, body: dict[str, Any], variant: str) -> RequestResult:
    """Send ``body``, time the first audio byte and the last byte, and check the answer is decodable
    24 kHz audio of ``variant``.

    The first audio byte is the first one past the WAV header: a streaming server may send the
    header before it has any audio.
    """
    from api.audio_io import WAV_HEADER_BYTES
    from audio import VOCODER_SR, decode_audio

    mode, streamed = body["step_audio"]["mode"], "stream_format" in body
    start = time.perf_counter()
    first: float | None = None
    chunks: list[bytes] = []
    received = 0
    try:
        with http.stream("POST", "/v1/audio/speech", json=body) as r:
            for chunk in r.iter_bytes():
                received += len(chunk)
                if first is None and received > WAV_HEADER_BYTES:
                    first = time.perf_counter() - start
                chunks.append(chunk)
            seconds = time.perf_counter() - start
            result = RequestResult(mode, streamed, r.status_code, seconds, first)
            data = b"".join(chunks)
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {data[:300].decode(errors='replace')}"
                return result
            if r.headers.get("x-step-audio-variant") != variant:
                result.error = f"answered by variant {r.headers.get('x-step-audio-variant')!r}, not {variant!r}"
            if "x-step-audio-audio-tokens" in r.headers:
                result.audio_tokens = int(r.headers["x-step-audio-audio-tokens"])
    except httpx.HTTPError as exc:
        return RequestResult(
            mode, streamed, 0, time.perf_counter() - start, first, error=f"{type(exc).__name__}: {exc}"
        )
    try:
        wav, sr = decode_audio(data)
    except Exception as exc:  # whatever the decoder refuses is a failure of the check, with its reason
        result.error = f"undecodable audio ({len(data)} bytes): {exc}"
        return result
    if sr != VOCODER_SR or wav.shape[-1] == 0:
        result.error = f"audio of {wav.shape[-1]} samples at {sr} Hz (expected > 0 at {VOCODER_SR} Hz)"
    result.audio_s = wav.shape[-1] / sr
    return result


def concurrent_clones(
    http: httpx.Client, variant: str, voice_b64: str, clients: int
) -> tuple[float, list[RequestResult]]:
    """``clients`` whole clone requests at once (distinct seeds); wall seconds and each result."""
    bodies = [speech_body("clone", variant, voice_b64, seed=100 + i, streamed=False) for i in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda b: run_request(http, b, variant), bodies))
    return time.perf_counter() - start, results


# --- decode speed -----------------------------------------------------------------------------------


def decode_tokens_per_s(scheduler: Scheduler, batch: int, steps: int, context: int = DECODE_CONTEXT) -> float:
    """Generated tokens per second of the server's own decode loop (its variant's ``Scheduler``),
    sampling, while ``batch`` requests decode together (median step; prefill excluded).

    The steps also reach the server's metrics (``bench.decode_timing`` passes them on); every
    request runs all ``steps`` because the check's bundle never stops early.
    """
    from bench.decode_timing import audio_prompts, time_decode

    prompts = audio_prompts(batch, context)
    time_decode(scheduler, prompts[:1], max_new_tokens=4, do_sample=True)  # warm-up: kernels, allocator
    return time_decode(scheduler, prompts, max_new_tokens=steps, do_sample=True).full_batch_tokens_per_s


# --- one variant --------------------------------------------------------------------------------------


def _gb(n_bytes: int) -> float:
    return round(n_bytes / 1024**3, 2)


def check_variant(variant: str, args: argparse.Namespace, voice_b64: str) -> VariantReport:
    """Start a server with ``variant`` only, run every request and measurement, and collect failures."""
    from api.loopback import LoopbackServer
    from engine.build import build_engine
    from engine.tts import StepAudioEngine
    from settings import Settings

    report = VariantReport(variant)
    cuda = args.device.startswith("cuda")
    device = torch.device(args.device)
    if cuda:  # the previous variant's server is gone: its memory must not count here
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    engines: list[StepAudioEngine] = []

    def factory(settings: Settings) -> StepAudioEngine:
        engine = build_engine(settings, max_new_tokens=args.max_new_tokens)
        engines.append(engine)
        return engine

    settings = Settings(
        model_path=args.root / "bundle",
        model_source="local",
        cache_dir=args.root / "server-cache",
        api_host="127.0.0.1",
        device=args.device,
        variants=[variant],
        queue_size=max(16, 2 * CONCURRENT_CLIENTS),
    )
    start = time.perf_counter()
    server = LoopbackServer(settings, engine_factory=factory, ready_timeout_s=LOAD_TIMEOUT_S)
    try:
        server.__enter__()
    except RuntimeError as exc:  # the load failure's reason, as /readyz gave it
        report.failures.append(f"{variant}: did not load: {exc}")
        return report
    try:
        report.load_s = round(time.perf_counter() - start, 2)
        if cuda:
            report.gpu_memory_after_load_gb = _gb(torch.cuda.memory_allocated(device))
        with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as http:
            _run_requests(http, report, voice_b64)
        for batch in DECODE_BATCHES:
            scheduler = engines[0].synthesizer.schedulers[variant]  # the loop the server's requests use
            tokens_per_s = decode_tokens_per_s(scheduler, batch, args.decode_steps)
            report.decode_tokens_per_s[batch] = round(tokens_per_s, 1)
    except Exception as exc:  # anything unexpected is this variant's failure; the other variants still run
        logger.exception("%s: the check stopped", variant)
        report.failures.append(f"{variant}: {type(exc).__name__}: {exc}")
    finally:
        if cuda:
            report.peak_gpu_memory_gb = _gb(torch.cuda.max_memory_allocated(device))
        server.__exit__(None, None, None)
        engines.clear()
    return report


def _run_requests(http: httpx.Client, report: VariantReport, voice_b64: str) -> None:
    variant = report.variant
    warm = run_request(http, speech_body("clone", variant, voice_b64, seed=1, streamed=False), variant)
    if warm.error:  # the first request also fills the prompt cache and warms the kernels; not reported
        report.failures.append(f"{variant} warm-up clone: {warm.error}")
    for seed, mode in enumerate(["clone", *(e[0] for e in EDITS)], start=10):
        for streamed in (False, True):
            result = run_request(http, speech_body(mode, variant, voice_b64, seed, streamed), variant)
            report.requests.append(result)
            logger.info(
                "%s %s %s: %s in %.2fs, %.2fs of audio",
                variant,
                mode,
                "streamed" if streamed else "whole",
                result.status,
                result.seconds,
                result.audio_s,
            )
    wall, results = concurrent_clones(http, variant, voice_b64, CONCURRENT_CLIENTS)
    for r in results:
        r.mode = f"clone x{CONCURRENT_CLIENTS}"
    report.requests.extend(results)
    alone = report.clone(streamed=False)
    if alone is not None and alone.seconds > 0:
        report.serving["tokens_per_s_1_client"] = round((alone.audio_tokens or 0) / alone.seconds, 1)
    report.serving[f"tokens_per_s_{CONCURRENT_CLIENTS}_clients"] = round(
        sum(r.audio_tokens or 0 for r in results) / wall, 1
    )
    report.serving[f"audio_s_per_s_{CONCURRENT_CLIENTS}_clients"] = round(sum(r.audio_s for r in results) / wall, 2)
    for r in report.requests:
        if r.error:
            report.failures.append(f"{variant} {r.mode} {'streamed' if r.streamed else 'whole'}: {r.error}")


# --- report ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def target_verdicts(reports: Sequence[VariantReport]) -> dict[str, dict[str, Any]]:
    """Each target against the base variant's figure (the targets are set for bf16 at full size)."""
    base = next((rep for rep in reports if rep.variant == "base"), None)
    if base is None:
        return {}
    whole, streamed = base.clone(streamed=False), base.clone(streamed=True)
    values = {
        "decode_tokens_per_s_batch1": base.decode_tokens_per_s.get(1),
        "rtf_clone": whole.rtf if whole else None,
        "first_audio_s": streamed.first_audio_s if streamed else None,
    }
    out = {}
    for name, (op, limit) in TARGETS.items():
        value = values[name]
        if value is not None:
            met = value >= limit if op == ">=" else value <= limit
            out[name] = {"value": round(value, 3), "target": f"{op} {limit}", "met": met}
    return out


def print_report(reports: Sequence[VariantReport], context: dict[str, Any]) -> None:
    print(
        f"\nGPU check on {context['device_name']} ({context['size']} bundle, "
        f"{context['max_new_tokens']} tokens per request)"
    )
    print(
        f"{'variant':8} {'load s':>7} {'decode tok/s b1':>15} {'b8':>8} {'http tok/s 1':>12} {'8 clients':>10} "
        f"{'RTF clone':>9} {'1st audio s':>11} {'peak GPU GB':>11} {'failures':>8}"
    )
    for rep in reports:
        whole, streamed = rep.clone(streamed=False), rep.clone(streamed=True)
        print(
            f"{rep.variant:8} {_fmt(rep.load_s, '.1f'):>7} {_fmt(rep.decode_tokens_per_s.get(1), '.1f'):>15} "
            f"{_fmt(rep.decode_tokens_per_s.get(8), '.1f'):>8} "
            f"{_fmt(rep.serving.get('tokens_per_s_1_client'), '.1f'):>12} "
            f"{_fmt(rep.serving.get(f'tokens_per_s_{CONCURRENT_CLIENTS}_clients'), '.1f'):>10} "
            f"{_fmt(whole.rtf if whole else None, '.3f'):>9} "
            f"{_fmt(streamed.first_audio_s if streamed else None, '.3f'):>11} "
            f"{_fmt(rep.peak_gpu_memory_gb):>11} {len(rep.failures):8d}"
        )
    print(
        f"\n{'variant':8} {'mode':16} {'whole/stream':12} {'status':>6} {'audio s':>8} {'total s':>8} "
        f"{'1st audio s':>11} {'RTF':>7}"
    )
    for rep in reports:
        for r in rep.requests:
            if r.mode.startswith("clone x"):
                continue
            print(
                f"{rep.variant:8} {r.mode:16} {'streamed' if r.streamed else 'whole':12} {r.status:6d} "
                f"{r.audio_s:8.2f} {r.seconds:8.2f} {_fmt(r.first_audio_s, '.3f'):>11} {_fmt(r.rtf, '.3f'):>7}"
            )
    verdicts = context.get("targets") or {}
    if verdicts:
        print("\nTargets (base variant; reported, not enforced):")
        for name, v in verdicts.items():
            print(f"  {name:28} {v['value']:>9} {v['target']:>9}  {'met' if v['met'] else 'MISSED'}")
    failures = [f for rep in reports for f in rep.failures]
    print(f"\n{len(failures)} failure(s)" + "".join(f"\n  - {f}" for f in failures))


# --- main -----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--size", choices=sorted(SIZE_DEFAULTS), default="full", help="bundle dimensions")
    parser.add_argument("--variants", default="base,awq,bnb", help="comma-separated subset of base,awq,bnb")
    parser.add_argument("--root", type=Path, default=None, help="bundle and cache (default bench/out/gpu-check-SIZE)")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "gpu_check.json", help="the JSON report")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="audio tokens per request (5 = 0.12 s)")
    parser.add_argument("--decode-steps", type=int, default=None, help="tokens per row of the decode measurement")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - {"base", "awq", "bnb"}
    if unknown or not args.variants:
        parser.error(f"--variants must name some of base, awq, bnb (got {args.variants})")
    args.root = (args.root or OUT_DIR / f"gpu-check-{args.size}").resolve()
    for name, default in SIZE_DEFAULTS[args.size].items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE)
        if torch.version.cuda is None:  # a GPU host with a CPU-only torch would otherwise look checked
            print(f"gpu-check: this torch ({torch.__version__}) is a CPU-only build; a GPU needs the CUDA build.")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per /readyz poll and request otherwise
    from bundles import write_bundle

    cuda = args.device.startswith("cuda")
    start = time.perf_counter()
    quantised = tuple(v for v in args.variants if v != "base")
    write_bundle(args.root / "bundle", size=args.size, seed=0, variants=quantised, eos=False, llm_device=args.device)
    bundle_s = time.perf_counter() - start
    voice_b64 = base64.b64encode(VOICE_WAV.read_bytes()).decode()
    reports = [check_variant(variant, args, voice_b64) for variant in args.variants]
    context: dict[str, Any] = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(torch.device(args.device))
        if cuda
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "size": args.size,
        "variants": args.variants,
        "max_new_tokens": args.max_new_tokens,
        "decode_steps": args.decode_steps,
        "decode_context": DECODE_CONTEXT,
        "concurrent_clients": CONCURRENT_CLIENTS,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "bundle_s": round(bundle_s, 1),
        "total_s": round(time.perf_counter() - start, 1),
        "targets": target_verdicts(reports) if cuda and args.size == "full" else {},
    }
    print_report(reports, context)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {**context, "variants_report": [_report_dict(r) for r in reports]}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"JSON: {args.out}")
    return 1 if any(rep.failures for rep in reports) else 0


def _report_dict(rep: VariantReport) -> dict[str, Any]:
    out = asdict(rep)
    for item, result in zip(out["requests"], rep.requests, strict=True):
        item["rtf"] = result.rtf
    return out


if __name__ == "__main__":
    sys.exit(main())
