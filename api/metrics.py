"""Prometheus metrics of one app (own ``CollectorRegistry``, so several apps can live in a process).

Per mode (clone, emotion, ...): requests by status, latency, time to first byte, real-time
factor (compute seconds / audio seconds), queue wait. Cache hit ratio and queue depth are read
from the engine and the service when Prometheus scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from api.errors import status_of
from errors import StepAudioError

if TYPE_CHECKING:
    from engine.service import JobTiming
    from engine.types import SynthesisResult
    from llm.decode import StepStats

Delivery = Literal["streamed", "whole"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
_RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class _LiveCollector(Collector):
    """Gauges computed at scrape time from callables (engine cache stats, queue state)."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        values = self._read()
        for name, (doc, value) in values.items():
            yield GaugeMetricFamily(name, doc, value=float(value))


class Metrics:
    """Every series of one app, in its own registry; requests record through the ``record_*`` methods."""

    def __init__(self, live: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = self._counter("step_audio_requests", "Speech requests by mode and HTTP status.", "status")
        self.latency = self._histogram("step_audio_request_latency_seconds", "Time from request to the last byte.")
        self.ttfb = self._histogram(
            "step_audio_time_to_first_byte_seconds", "Time from request to the first audio byte."
        )
        self.ttfa = self._histogram(
            "step_audio_time_to_first_audio_seconds",
            "Time from request to the first audio byte, by mode and delivery (streamed: the streaming "
            "vocoder, while the LLM generates; whole: after the whole generation).",
            "delivery",
        )
        self.stream_start = self._histogram(
            "step_audio_stream_first_audio_generation_fraction",
            "Share of a streamed request's LLM ids already sampled when its first audio left "
            "(below 1: audio was on its way while the LLM still generated).",
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
        )
        self.rtf = self._histogram(
            "step_audio_real_time_factor",
            "Inference seconds per second of audio produced (lower is faster).",
            buckets=_RTF_BUCKETS,
        )
        self.queue_wait = self._histogram(
            "step_audio_queue_wait_seconds", "Time a request waited for an inference worker."
        )
        self.audio_seconds = self._counter("step_audio_audio_seconds", "Seconds of audio produced.")
        self.cache_lookups = self._counter(
            "step_audio_request_cache_lookups",
            "Prompt-token cache lookups seen by requests, by mode and result (hit, miss).",
            "result",
        )
        self.truncated = self._counter(
            "step_audio_truncated_requests",
            "Requests with a generation that ended at the length limit instead of its stop id (audio cut short).",
        )
        self.registry.register(_LiveCollector(live))
        # Continuous batching (llm.decode calls on_admit / on_step on its loop thread), by LLM variant.
        self.llm_batch_size = self._histogram(
            "step_audio_llm_batch_size", "Requests sharing each LLM decode step.", by="variant", buckets=_BATCH_BUCKETS
        )
        self.llm_queue_wait = self._histogram(
            "step_audio_llm_queue_wait_seconds",
            "Time a generation waited for room in its LLM's running batch.",
            by="variant",
        )
        self.llm_tokens = self._counter("step_audio_llm_tokens", "Audio tokens generated.", by="variant")
        self.llm_decode_seconds = self._counter(
            "step_audio_llm_decode_seconds",
            "Time spent in decode steps; tokens / seconds is the decode rate in tokens/s.",
            by="variant",
        )

    def _counter(self, name: str, doc: str, *labels: str, by: str = "mode") -> Counter:
        return Counter(name, doc, [by, *labels], registry=self.registry)

    def _histogram(
        self, name: str, doc: str, *labels: str, by: str = "mode", buckets: tuple[float, ...] = _LATENCY_BUCKETS
    ) -> Histogram:
        return Histogram(name, doc, [by, *labels], buckets=buckets, registry=self.registry)

    # --- one speech request (api.pipeline, api.responses, the web UI) ------------------------------
    def record_status(self, mode: str, outcome: int | StepAudioError) -> None:
        """A request that ended otherwise than in full: its HTTP status (499: the client went away)."""
        status = status_of(outcome) if isinstance(outcome, StepAudioError) else outcome
        self.requests.labels(mode, str(status)).inc()

    def record_run(self, mode: str, result: SynthesisResult, timing: JobTiming) -> None:
        """A finished job: queue wait, real-time factor, audio seconds, cache lookups, and for a
        streamed one how far its LLM was when the first audio left."""
        audio_s = len(result.audio) / result.sample_rate
        self.queue_wait.labels(mode).observe(timing.queue_wait_s)
        if audio_s > 0:
            self.rtf.labels(mode).observe(timing.run_s / audio_s)
        self.audio_seconds.labels(mode).inc(audio_s)
        for key, n in (("hit", result.cache_hits), ("miss", result.cache_misses)):
            if n > 0:
                self.cache_lookups.labels(mode, key).inc(n)
        fraction = result.timings.stream_start_fraction()
        if fraction is not None:
            self.stream_start.labels(mode).observe(fraction)
        if result.cut_short:
            self.truncated.labels(mode).inc()

    def record_first_byte(self, mode: str, t0: float) -> None:
        """The first byte of the answer to a request that started at ``t0`` (``time.perf_counter``) left."""
        self.ttfb.labels(mode).observe(time.perf_counter() - t0)

    def record_first_audio(self, mode: str, delivery: Delivery, t0: float) -> None:
        """The first audio byte left: time to first byte and to first audio, by delivery."""
        elapsed = time.perf_counter() - t0
        self.ttfb.labels(mode).observe(elapsed)
        self.ttfa.labels(mode, delivery).observe(elapsed)

    def record_answered(self, mode: str, t0: float) -> None:
        """A request answered in full: its latency from ``t0`` and a 200."""
        self.latency.labels(mode).observe(time.perf_counter() - t0)
        self.requests.labels(mode, "200").inc()

    # --- the decode loops (llm.decode calls these on its thread) -----------------------------------
    def on_admit(self, variant: str, queue_wait_s: float) -> None:
        self.llm_queue_wait.labels(variant).observe(queue_wait_s)

    def on_step(self, variant: str, stats: StepStats) -> None:
        self.llm_batch_size.labels(variant).observe(stats.requests)
        self.llm_tokens.labels(variant).inc(stats.requests)
        self.llm_decode_seconds.labels(variant).inc(stats.seconds)
