"""Live playback in the web UI: audio reaches the page while the engine still generates it.

Driven with the page's own protocol (``tests.ui_page``: the requests a browser sends) against
the real server on the tiny bundle. The evidence is server-side and does not depend on this machine's speed: on
a bundle whose LLM never stops before its cap (``eos=False``), the page's player already has a
segment of audio to fetch while the job is still running, and leaving the page then stops a
generation that would otherwise have run to ``NEVER_ENDING`` ids (the generation's own log line
says how many it sampled). Gradio's streaming player encodes with the ``ffmpeg`` program: these
tests skip where it is missing (the page then plays complete results, which ``test_ui`` covers).
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from api.app import create_app
from bundles import write_bundle
from settings import Settings
from tests.api_live import LiveServer, test_settings
from tests.ui_page import UiPage

REPO = Path(__file__).resolve().parents[1]
VOICE_WAV = REPO / "engine" / "default_voice" / "voice.wav"
TEXT = "A long streamed sentence."
LONG = 150  # ids per generation: several streamed pieces
NEVER_ENDING = 5000  # 2 min of audio: no generation here reaches it before its page leaves
AAC_SLACK_S = 0.2  # the AAC encoder's priming and last-frame padding

needs_ffmpeg = pytest.mark.skipif(
    shutil.which("ffmpeg") is None,
    reason="no ffmpeg program on PATH: Gradio's streaming player encodes with it (.ci/run installs it)",
)


def _metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def _decoded_seconds(data: bytes) -> float:
    """Seconds of audio in an AAC (ADTS) stream, decoded with FFmpeg's library as a player would."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples / stream.rate


def _segments(playlist_url: str) -> list[tuple[float, str]]:
    """The (seconds, URL) of each segment the page's player can fetch now."""
    text = httpx.get(playlist_url, timeout=30).text
    found = re.findall(r"#EXTINF:([\d.]+),\s*\n(\S+)", text)
    base = playlist_url.rsplit("/", 1)[0]
    return [(float(seconds), f"{base}/{name}") for seconds, name in found]


def _live_url(server: LiveServer, update: Any) -> str:
    assert isinstance(update, dict) and update.get("is_stream"), update
    url = str(update["url"])
    return url if url.startswith("http") else f"{server.url}{url}"


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = test_settings(tiny_bundle, tmp_path_factory.mktemp("ui-stream-cache"), enable_auto_transcribe=False)
    with LiveServer(settings, max_new_tokens=LONG) as live:
        yield live


@pytest.fixture(scope="module")
def endless(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Every generation would run to NEVER_ENDING ids."""
    bundle = write_bundle(tmp_path_factory.mktemp("ui-no-eos-bundle"), "tiny", eos=False)
    settings = test_settings(bundle, tmp_path_factory.mktemp("ui-no-eos-cache"), enable_auto_transcribe=False)
    with LiveServer(settings, max_new_tokens=NEVER_ENDING) as live:
        yield live


@needs_ffmpeg
def test_a_clone_plays_while_generating_and_leaving_the_page_stops_it(
    endless: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm.decode")
    service = endless.app.state.step_audio.service
    gone_before = _metric(endless.url, "step_audio_requests_total", mode="clone", status="499")
    with UiPage(endless.url) as page:
        job = page.submit("clone-run", None, "default", "", TEXT, "base", 1.0, "5", "wav")
        deadline = time.monotonic() + 120
        while not job.outputs() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert job.outputs(), "no live update arrived"
        playlist = _live_url(endless, job.outputs()[0][0])
        segments: list[tuple[float, str]] = []
        while not segments and time.monotonic() < deadline:
            segments = _segments(playlist)
        assert segments, "the live player has no audio to fetch"
        # the page can fetch real audio now, and the job that makes it is still running
        assert _decoded_seconds(httpx.get(segments[0][1], timeout=30).content) > 0
        assert service.running == 1 and not job.done()
        job.cancel()  # the page stops the event (what it sends when the user leaves or stops it)
        while service.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert service.running == 0
    lines = [m for rec in caplog.records if (m := rec.getMessage()).startswith("generated ")]
    assert len(lines) == 1, lines
    generated = int(re.match(r"generated (\d+) ids", lines[0]).group(1))  # type: ignore[union-attr]
    assert generated < NEVER_ENDING and "cancelled" in lines[0], lines[0]
    assert _metric(endless.url, "step_audio_requests_total", mode="clone", status="499") == gone_before + 1


@needs_ffmpeg
def test_a_streamed_clone_ends_with_the_whole_audio_downloadable_and_counted(server: LiveServer) -> None:
    url = server.url
    ok_before = _metric(url, "step_audio_requests_total", mode="clone", status="200")
    latency_before = _metric(url, "step_audio_request_latency_seconds_count", mode="clone")
    audio_before = _metric(url, "step_audio_audio_seconds_total", mode="clone")
    with UiPage(server.url) as page:
        job = page.submit("clone-run", None, "default", "", TEXT, "base", 1.0, "9", "wav")
        live, out, summary, _ = job.result()  # (live player, output, summary, the last output's state)
        updates = job.outputs()
        final = page.fetch(out)
    pieces = [u[0] for u in updates[:-1] if isinstance(u[0], dict) and u[0].get("is_stream")]
    assert len(pieces) > 2, "the audio arrived in several live pieces before the result"
    assert all(_live_url(server, p) == _live_url(server, pieces[0]) for p in pieces)  # one stream
    # the other updates before the result are the line under the output: which segment was spoken
    assert all("spoken" in u[2] for u in updates[:-1] if not (isinstance(u[0], dict) and u[0].get("is_stream")))
    assert isinstance(live, dict) and live.get("__type__") == "update"  # the result leaves the stream as it is
    samples, sample_rate = sf.read(io.BytesIO(final))
    seconds = len(samples) / sample_rate
    assert sample_rate == 24000 and seconds > 0 and "**seed** 9" in summary
    # the live stream carried all of it: the player's whole-stream file decodes to the same length
    streamed = httpx.get(_live_url(server, pieces[0]).replace("playlist.m3u8", "playlist-file"), timeout=30)
    assert abs(_decoded_seconds(streamed.content) - seconds) <= AAC_SLACK_S
    # the UI's request counts in the API's request series
    assert _metric(url, "step_audio_requests_total", mode="clone", status="200") == ok_before + 1
    assert _metric(url, "step_audio_request_latency_seconds_count", mode="clone") == latency_before + 1
    assert _metric(url, "step_audio_audio_seconds_total", mode="clone") == pytest.approx(
        audio_before + seconds, abs=1e-3
    )


@needs_ffmpeg
def test_an_edit_streams_only_its_last_iteration(server: LiveServer) -> None:
    with UiPage(server.url) as page:
        # denoise: no edit_info (the page fills those choices on load, which this session does not run)
        job = page.submit("edit-run", page.upload(VOICE_WAV), "denoise", None, "", "", 2, "base", 1.0, "4", "wav")
        result = job.result()
        updates = job.outputs()
        lengths = []
        for out in (result[1], result[2]):
            samples, sample_rate = sf.read(io.BytesIO(page.fetch(out["value"])))
            lengths.append(len(samples) / sample_rate)
    streamed = httpx.get(_live_url(server, updates[0][0]).replace("playlist.m3u8", "playlist-file"), timeout=30)
    seconds = _decoded_seconds(streamed.content)
    assert abs(seconds - lengths[1]) <= AAC_SLACK_S, (seconds, lengths)
    assert seconds < sum(lengths) - AAC_SLACK_S, (seconds, lengths)  # not the first iteration's audio too


def test_without_ffmpeg_the_page_has_no_live_player(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no ffmpeg program anywhere on it
    client = TestClient(create_app(Settings(cache_dir=tmp_path / "cache")))  # no lifespan: no models needed
    components = client.get("/ui/config").json()["components"]
    live = [c for c in components if c.get("props", {}).get("elem_id") in ("clone-live", "edit-live")]
    assert len(live) == 2 and all(c["props"]["visible"] is False for c in live)


@needs_ffmpeg
def test_a_long_text_shows_each_spoken_segment_while_it_plays(tiny_bundle: Path, tmp_path: Path) -> None:
    """The Clone tab's line under the output says which segment of a long text has been spoken."""
    text = "The first part is here. A second part follows it. And a third part ends the text."
    settings = test_settings(tiny_bundle, tmp_path / "cache", enable_auto_transcribe=False, segment_max_tokens=8)
    with LiveServer(settings, max_new_tokens=20) as live, UiPage(live.url) as page:
        segments = live.app.state.step_audio.engine.segments(text)
        assert len(segments) >= 3
        event = page.submit("clone-run", None, "default", "", text, "base", 1.0, "5", "wav")
        final = event.result()
        lines = [out[2] for out in event.outputs() if isinstance(out[2], str) and "spoken" in out[2]]
    assert lines[0].startswith(f"**segment 1 of {len(segments)}** spoken: {segments[0].text}")
    assert any(line.startswith(f"**segment {len(segments)} of {len(segments)}**") for line in lines)
    assert f"**segments** {len(segments)}" in final[2]  # the summary of the finished run
