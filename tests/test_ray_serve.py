"""Replicas on a real local Ray cluster, shared state in a real S3-compatible server (moto).

``deploy.ray_serve.LocalCluster`` (what ``python -m deploy.ray_serve`` runs) deploys two CPU
replicas of the speech API and the web UI's replica, each the real app on the tiny bundle with
its own local cache directory, all sharing one object store. Everything goes through Serve's
proxy, as a client's requests would: a voice registered once is spoken by both replicas; a
prompt tokenized on one is a shared-level hit on the other; streams arrive in pieces; the app's
own 429 comes through; WebSockets and the web UI work; a replica killed with SIGKILL mid-stream
ends that stream at once while the rest keep serving and Serve replaces it; a stopped store
refuses registration with a 503 while speech that needs nothing from it goes on; and a rolling
restart loses no voice.

Every generation runs to ``MAX_NEW_TOKENS`` ids (a bundle whose LLM never stops early), about a
second of CPU per request: long enough that a stream is still being generated when its first
piece reaches the client. Ray's node, Serve's proxy, the side ports and the store all listen on
127.0.0.1; the cluster takes 2 CPUs and is shut down after the module.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest

from tests.api_live import LOOPBACK
from tests.s3_server import MotoS3
from tests.test_audio_voices import VOICE_TEXT, VOICE_WAV, clip

pytest.importorskip("ray.serve")

from ray import serve

from bundles import write_bundle
from deploy.options import AppArgs, ReplicaOptions
from deploy.ray_serve import SPEECH_APP, LocalCluster, speech_app
from tests.ui_page import UiPage

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 300  # ids per generation (7.2 s of audio): about a second of CPU here
DEPLOYMENT = "StepAudio"
SPEAK = {"model": "tts-1", "voice": "alloy", "input": "Hello from a replica.", "response_format": "pcm"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def free_side_ports() -> int:
    """A base whose +0 and +1 (the two speech replicas) and +100 (the UI's) are free, outside Ray's
    worker port range (10002-19999)."""
    for _ in range(100):
        base = random.randrange(30000, 60000)
        try:
            for port in (base, base + 1, base + 100):
                with socket.socket() as s:
                    s.bind((LOOPBACK, port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free side ports")


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s")
        time.sleep(0.1)


@dataclass
class Cluster:
    local: LocalCluster
    store: MotoS3
    side_base: int
    voices: list[str] = field(default_factory=list)  # registered by the tests, none may be lost

    @property
    def url(self) -> str:
        return self.local.url

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def side(self) -> dict[str, int]:
        """Replica tag -> its side port, for the speech replicas' two ports."""
        found = {}
        for port in (self.side_base, self.side_base + 1):
            try:
                found[httpx.get(f"http://{LOOPBACK}:{port}/healthz", timeout=5).json()["replica"]] = port
            except httpx.HTTPError:
                continue
        return found

    def metric(self, tag: str, name: str) -> float:
        text = httpx.get(f"http://{LOOPBACK}:{self.side()[tag]}/metrics", timeout=5).text
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, flags=re.M))


def replica_pids() -> dict[str, int]:
    """Tag -> pid of every live speech replica (Ray's actor table; no dashboard needed)."""
    from ray._private.state import state

    return {
        actor["Name"].rsplit("#", 1)[-1]: int(actor["Pid"])
        for actor in state.actor_table(None).values()
        if actor["ActorClassName"] == f"ServeReplica:{SPEECH_APP}:{DEPLOYMENT}" and actor["State"] == "ALIVE"
    }


def running_replicas() -> int:
    deployment = serve.status().applications[SPEECH_APP].deployments[DEPLOYMENT]
    return int(deployment.replica_states.get("RUNNING", 0))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    bundle = write_bundle(tmp_path_factory.mktemp("no-eos-bundle"), "tiny", eos=False)
    with MotoS3() as store, pytest.MonkeyPatch.context() as env:
        # the replicas inherit this process's environment: the store's endpoint and credentials
        # travel that way, never as arguments
        for name, value in {
            **store.env,
            "RAY_AUTH_MODE": "disabled",  # a loopback cluster of this test; no token file in $HOME
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_DEDUP_LOGS": "0",
            "STEP_AUDIO_TEST_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS),
        }.items():
            env.setenv(name, value)
        side_base = free_side_ports()
        args = AppArgs(
            server={
                "model_path": str(bundle),
                "cache_dir": str(tmp_path_factory.mktemp("replica-cache")),
                "device": "cpu",
                "api_host": LOOPBACK,
                "store_url": store.url("cluster"),
                "enable_auto_transcribe": False,
                "inference_workers": 2,
                "queue_size": 2,
            },
            replica=ReplicaOptions(
                replicas=2,
                num_cpus=0.25,
                metrics_port=side_base,
                replica_cache_dirs=True,  # as on two hosts: only the shared level is common
                graceful_shutdown_timeout_s=5,
                app_factory="tests.ray_apps:create_app",
            ),
        )
        with LocalCluster(args, host=LOOPBACK, port=free_port(), num_cpus=2, num_gpus=0) as local:
            yield Cluster(local, store, side_base)


def speak(http: httpx.Client, body: dict[str, Any] | None = None) -> httpx.Response:
    return http.post("/v1/audio/speech", json=body or SPEAK)


def test_two_replicas_answer_through_the_proxy_each_ready_with_its_models(cluster: Cluster) -> None:
    with httpx.Client(base_url=cluster.url, timeout=60) as http:
        tags = {http.get("/readyz").headers["x-step-audio-replica"] for _ in range(20)}
    assert len(tags) == 2 and set(cluster.side()) == tags
    for tag in tags:  # each replica's own side port: ready, and its own registry
        assert httpx.get(f"http://{LOOPBACK}:{cluster.side()[tag]}/readyz", timeout=5).json()["status"] == "ready"
        assert cluster.metric(tag, "step_audio_ready") == 1
        assert cluster.metric(tag, f'step_audio_replica_info{{replica="{tag}"}}') == 1


def test_a_voice_registered_once_is_spoken_by_both_replicas_and_its_prompt_is_shared(cluster: Cluster) -> None:
    client = cluster.sdk()
    consent = client.audio.voice_consents.create(
        name="ray consent", language="en-US", recording=("c.wav", clip(0.5), "audio/wav")
    )
    created = client.audio.voices.with_raw_response.create(
        name="ray voice",
        consent=consent.id,
        audio_sample=("s.wav", clip(1.0, 21), "audio/wav"),
        extra_body={"transcript": VOICE_TEXT},
    )
    assert created.status_code == 201
    voice, registrar = created.parse(), created.headers["x-step-audio-replica"]
    cluster.voices.append(voice.id)
    assert consent.id in [c.id for c in client.audio.voice_consents.list()]
    other = next(tag for tag in cluster.side() if tag != registrar)
    shared_before = cluster.metric(other, "step_audio_cache_shared_hits")
    served: dict[str, list[str]] = {}
    with httpx.Client(base_url=cluster.url, timeout=120) as http:
        for _ in range(16):  # right after the 201, until both replicas have answered
            r = speak(http, {**SPEAK, "voice": {"id": voice.id}})
            assert r.status_code == 200, r.text
            served.setdefault(r.headers["x-step-audio-replica"], []).append(r.headers["x-step-audio-cache"])
            if len(served) == 2:
                break
    assert set(served) == {registrar, other}, served
    # the other replica's own cache never saw this sample: its first request hit the shared level
    assert served[other][0] == "hit"
    assert cluster.metric(other, "step_audio_cache_shared_hits") == shared_before + 1
    # and the official SDK's speech.create names the voice as OpenAI's custom voices are named
    assert len(client.audio.speech.create(model="tts-1", voice={"id": voice.id}, input="SDK.").content) > 0


def test_the_sdk_lists_and_deletes_voices_through_the_proxy(cluster: Cluster) -> None:
    """A voice created, listed (OpenAI's list is a plain GET: the SDK has no list method) and deleted through
    the proxy: every replica then refuses it, and its consent goes too."""
    client = cluster.sdk()
    consent = client.audio.voice_consents.create(
        name="short-lived", language="en-US", recording=("c.wav", clip(0.5), "audio/wav")
    )
    voice = client.audio.voices.create(
        name="short-lived",
        consent=consent.id,
        audio_sample=("s.wav", clip(1.0, 5), "audio/wav"),
        extra_body={"transcript": VOICE_TEXT},
    )
    with httpx.Client(base_url=cluster.url, timeout=120) as http:
        assert voice.id in [v["id"] for v in http.get("/v1/audio/voices").json()["data"]]
        assert client.audio.voices.delete(voice.id).deleted
        for _ in range(6):  # whichever replica answers, the voice is gone from the shared store
            r = speak(http, {**SPEAK, "voice": {"id": voice.id}})
            assert r.status_code == 400 and "unknown voice" in r.json()["error"]["message"]
        assert voice.id not in [v["id"] for v in http.get("/v1/audio/voices").json()["data"]]
    assert client.audio.voice_consents.delete(consent.id).deleted


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_streams_arrive_in_pieces_while_the_replica_still_generates(cluster: Cluster, stream_format: str) -> None:
    pieces: list[bytes] = []
    with (
        httpx.Client(base_url=cluster.url, timeout=120) as http,
        http.stream("POST", "/v1/audio/speech", json={**SPEAK, "stream_format": stream_format}) as r,
    ):
        assert r.status_code == 200
        tag = r.headers["x-step-audio-replica"]
        for piece in r.iter_raw():
            if not pieces:  # the first piece is here: the replica is still generating this request
                assert cluster.metric(tag, "step_audio_requests_running") == 1
            pieces.append(piece)
    assert len(pieces) > 2
    if stream_format == "sse":
        events = [json.loads(line[6:]) for line in b"".join(pieces).decode().splitlines() if line.startswith("data: ")]
        assert events[-1]["type"] == "speech.audio.done" and len(events) > 2


def test_a_full_replica_answers_with_the_apps_own_429(cluster: Cluster) -> None:
    """Serve lets through more than the app admits, so the app's 429 (JSON, Retry-After) is what a client sees."""
    with httpx.Client(base_url=cluster.url, timeout=120) as http, concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: speak(http), range(12)))
    refused = [r for r in answers if r.status_code == 429]
    assert refused and all(r.status_code in (200, 429) for r in answers), [r.status_code for r in answers]
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded" and r.headers["retry-after"] for r in refused)


def test_websockets_and_the_web_ui_pass_through_the_proxy(cluster: Cluster) -> None:
    from websockets.sync.client import connect

    with connect(cluster.url.replace("http", "ws") + "/v1/audio/speech/stream") as socket_:  # text in, speech out
        socket_.send(json.dumps({"type": "session.config", "voice": "alloy", "response_format": "pcm"}))
        socket_.send(json.dumps({"type": "input.text", "text": "Through the proxy. "}))
        socket_.send(json.dumps({"type": "input.text", "text": "And back again."}))
        socket_.send(json.dumps({"type": "input.done"}))
        frames, events = 0, []
        while not events or events[-1]["type"] not in ("session.done", "error"):
            message = socket_.recv(timeout=120)
            if isinstance(message, bytes):
                frames += len(message)
            else:
                events.append(json.loads(message))
    assert events[-1]["type"] == "session.done" and events[-1]["total_sentences"] == 2 and frames > 0
    with httpx.Client(base_url=cluster.url, timeout=60) as http:
        root = http.get("/")
        assert root.status_code == 307 and root.headers["location"] == "/ui/"
        assert http.get("/ui/").status_code == 200
    with UiPage(cluster.url) as page:  # the page's calls come in two requests: both reach the one UI replica
        message, *_ = page.run("voice-register", "ui_voice", page.upload(VOICE_WAV), VOICE_TEXT)
    assert "ui_voice" in message
    cluster.voices.append("ui_voice")
    with httpx.Client(base_url=cluster.url, timeout=120) as http:  # the UI's voice, in the shared store
        assert speak(http, {**SPEAK, "voice": "ui_voice"}).status_code == 200


def test_a_replica_killed_mid_stream_ends_that_stream_and_is_replaced(cluster: Cluster) -> None:
    before = cluster.side()
    statuses: list[int] = []  # the killed replica's side port while it is replaced (0: not listening)
    done = threading.Event()
    error: Exception | None = None
    killed = 0.0
    with httpx.Client(base_url=cluster.url, timeout=httpx.Timeout(30, read=10)) as http:
        began = time.monotonic()
        try:
            with http.stream("POST", "/v1/audio/speech", json={**SPEAK, "stream_format": "audio"}) as r:
                tag = r.headers["x-step-audio-replica"]
                for _ in r.iter_raw():
                    if not killed:  # its first piece arrived: the replica is mid-stream
                        os.kill(replica_pids()[tag], signal.SIGKILL)
                        killed = time.monotonic()
        except httpx.TransportError as exc:
            error = exc
        ended = time.monotonic()
    assert killed and isinstance(error, httpx.RemoteProtocolError), error  # a cut transfer, not a normal end
    assert ended - killed < 5.0 and ended - began < 60.0

    port = before[tag]

    def watch() -> None:
        while not done.is_set():
            try:
                statuses.append(httpx.get(f"http://{LOOPBACK}:{port}/readyz", timeout=2).status_code)
            except httpx.TransportError:
                statuses.append(0)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with httpx.Client(base_url=cluster.url, timeout=120) as http:
            answers = [speak(http).status_code for _ in range(20)]
        assert answers == [200] * 20
        wait_until(
            lambda: running_replicas() == 2 and tag not in replica_pids() and len(cluster.side()) == 2,
            120,
            "Serve replaced the killed replica",
        )
    finally:
        done.set()
        watcher.join()
    # the replacement took the same side port; it said 503 while loading and 200 once loaded
    assert 503 in statuses and statuses[-1] == 200, statuses


def test_a_stopped_store_refuses_registration_and_speech_goes_on(cluster: Cluster) -> None:
    client = cluster.sdk()
    cluster.store.stop()
    try:
        with pytest.raises(openai.APIStatusError) as refused:
            client.audio.voice_consents.create(name="c", language="en", recording=("c.wav", clip(0.5), "audio/wav"))
        assert refused.value.status_code == 503 and "voice store is unreachable" in refused.value.message
        with httpx.Client(base_url=cluster.url, timeout=120) as http:
            ours = http.post(
                "/v1/voices", data={"name": "offline", "transcript": VOICE_TEXT}, files={"file": ("v.wav", clip())}
            )
            assert ours.status_code == 503 and ours.json()["error"]["code"] == "storage_unavailable"
            assert [speak(http).status_code for _ in range(2)] == [200, 200]  # the default voice
            with_transcript = http.post(
                "/v1/audio/speech/upload",
                data={"payload": json.dumps({**SPEAK, "step_audio": {"prompt_text": "a clip and its words"}})},
                files={"prompt_audio_file": ("p.wav", clip(0.8, 33), "audio/wav")},
            )
            assert with_transcript.status_code == 200, with_transcript.text
    finally:
        cluster.store.start()
    with httpx.Client(base_url=cluster.url, timeout=120) as http:
        again = http.post(
            "/v1/voices", data={"name": "online", "transcript": VOICE_TEXT}, files={"file": ("v.wav", clip())}
        )
        assert again.status_code == 201, again.text
        cluster.voices.append("online")
        listed = {v["id"] for v in http.get("/v1/voices").json()["data"]}
    assert set(cluster.voices) <= listed


def test_a_rolling_restart_loses_no_voice(cluster: Cluster) -> None:
    old = set(replica_pids())
    args = cluster.local.args
    changed = args.model_copy(update={"server": {**args.server, "log_level": "WARNING"}})  # a new version
    serve.run(speech_app(changed.model_dump(mode="json")), name=SPEECH_APP, route_prefix="/")
    wait_until(lambda: running_replicas() == 2 and not old & set(replica_pids()), 180, "the rolling restart")
    with httpx.Client(base_url=cluster.url, timeout=120) as http:
        listed = {v["id"] for v in http.get("/v1/voices").json()["data"]}
        assert set(cluster.voices) <= listed
        for voice in cluster.voices:
            r = speak(http, {**SPEAK, "voice": voice})
            assert r.status_code == 200 and r.headers["x-step-audio-replica"] not in old
