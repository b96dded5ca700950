"""Edit chains, ``instructions`` and inline tags through the real server (tiny bundle) and the real OpenAI client.

Every chain is compared with the same requests made by hand, feeding each WAV answer into the next
request with the seed the chain documents (generation i of a request uses seed + i): the audio
must be byte-identical.
"""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import soundfile as sf

from tests.api_live import LiveServer, live_server

REPO = Path(__file__).resolve().parents[1]
VOICE_WAV = REPO / "engine" / "default_voice" / "voice.wav"
VOICE_TEXT = (REPO / "engine" / "default_voice" / "transcript.txt").read_text().strip()
TEXT = "The quick brown fox jumps over the lazy dog."
MAX_STEPS = 3
MAX_GENERATIONS = 5
NOT_AUDIO = base64.b64encode(b"not audio at all, never decoded" * 8).decode()


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    yield from live_server(
        tiny_bundle,
        tmp_path_factory,
        "chains-cache",
        enable_auto_transcribe=False,  # every transcript flows along the chain: Whisper is never needed
        max_chain_steps=MAX_STEPS,
        max_chain_generations=MAX_GENERATIONS,
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def speech(http: httpx.Client, body: dict) -> httpx.Response:
    r = http.post("/v1/audio/speech", json=body)
    assert r.status_code == 200, r.text
    return r


def clone_body(voice_b64: str, text: str, seed: int, **step_audio: object) -> dict:
    options = {"seed": seed, "prompt_text": VOICE_TEXT, "prompt_audio_base64": voice_b64, **step_audio}
    return {"input": text, "response_format": "wav", "step_audio": options}


def edit_by_hand(http: httpx.Client, audio: bytes, text: str, seed: int, *, input: str = "", **step: object) -> bytes:
    """One edit request on a WAV answer, as a client would chain them."""
    options = {"input_audio_base64": b64(audio), "audio_text": text, "seed": seed, **step}
    return speech(http, {"input": input, "response_format": "wav", "step_audio": options}).content


def test_a_two_step_chain_equals_the_same_requests_made_by_hand(http: httpx.Client, voice_b64: str) -> None:
    edits = [{"mode": "emotion", "edit_info": "happy", "n_edit_iter": 2}, {"mode": "style", "edit_info": "whisper"}]
    chain = speech(http, clone_body(voice_b64, TEXT, 40, edits=edits))
    assert chain.headers["x-step-audio-iterations"] == "4"
    assert chain.headers["x-step-audio-edits"] == "emotion=happy x2; style=whisper"
    # by hand: clone (seed 40), then emotion twice (seeds 41, 42: one request with seed 41), then style (43)
    cloned = speech(http, clone_body(voice_b64, TEXT, 40)).content
    happy = edit_by_hand(http, cloned, TEXT, 41, mode="emotion", edit_info="happy", n_edit_iter=2)
    whisper = edit_by_hand(http, happy, TEXT, 43, mode="style", edit_info="whisper")
    assert chain.content == whisper

    # and on a given audio: the request's own edit is step 1, step_audio.edits follow
    on_audio = speech(
        http,
        {
            "response_format": "wav",
            "step_audio": {
                "mode": "emotion",
                "edit_info": "happy",
                "n_edit_iter": 2,
                "input_audio_base64": b64(cloned),
                "audio_text": TEXT,
                "seed": 41,
                "edits": [{"mode": "style", "edit_info": "whisper"}],
            },
        },
    )
    assert on_audio.content == whisper


def test_return_iterations_labels_every_step(http: httpx.Client, voice_b64: str) -> None:
    edits = [{"mode": "speed", "edit_info": "faster"}, {"mode": "denoise"}]
    body = clone_body(voice_b64, TEXT, 60, edits=edits, return_iterations=True)
    answer = http.post("/v1/audio/speech", json=body)
    assert answer.status_code == 200, answer.text
    items = answer.json()["iterations"]
    labels = [(i["index"], i["step"], i["mode"], i["edit_info"], i["iteration"], i["seed"]) for i in items]
    assert labels == [(1, 0, "clone", None, 1, 60), (2, 1, "speed", "faster", 1, 61), (3, 2, "denoise", None, 1, 62)]
    cloned = speech(http, clone_body(voice_b64, TEXT, 60)).content
    faster = edit_by_hand(http, cloned, TEXT, 61, mode="speed", edit_info="faster")
    final = speech(http, clone_body(voice_b64, TEXT, 60, edits=edits)).content
    assert [base64.b64decode(i["audio_base64"]) for i in items] == [cloned, faster, final]


def test_inline_tags_in_clone_text_become_a_paralinguistic_step(http: httpx.Client, voice_b64: str) -> None:
    tagged = "Well [Laughter] that was [Breathing] fun."
    chain = speech(http, clone_body(voice_b64, tagged, 70))
    assert chain.headers["x-step-audio-edits"] == "paralinguistic"
    assert chain.headers["x-step-audio-iterations"] == "2"
    spoken = speech(http, clone_body(voice_b64, "Well that was fun.", 70)).content
    by_hand = edit_by_hand(http, spoken, "Well that was fun.", 71, mode="paralinguistic", input=tagged)
    assert chain.content == by_hand
    plain = speech(http, clone_body(voice_b64, "Read [chapter 3] now.", 70))  # not a tag: spoken as text
    assert "x-step-audio-edits" not in plain.headers and plain.headers["x-step-audio-iterations"] == "1"


def test_openai_sdk_instructions_become_edits(server: LiveServer, http: httpx.Client) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def create(instructions: str) -> tuple[bytes, httpx.Headers]:
        raw = client.audio.speech.with_raw_response.create(
            model="gpt-4o-mini-tts",
            voice="alloy",
            input=TEXT,
            instructions=instructions,
            response_format="wav",
            extra_body={"step_audio": {"seed": 80}},
        )
        return raw.content, raw.headers

    audio, headers = create("Speak in a cheerful tone, but not too fast.")
    assert headers["x-step-audio-edits"] == "emotion=happy; speed=slower"
    assert headers["x-step-audio-iterations"] == "3"
    edits = [{"mode": "emotion", "edit_info": "happy"}, {"mode": "speed", "edit_info": "slower"}]
    same = {"input": TEXT, "voice": "alloy", "response_format": "wav", "step_audio": {"seed": 80, "edits": edits}}
    assert speech(http, same).content == audio

    nothing, headers = create("Use a pirate accent.")  # maps to nothing: accepted, reported, plain clone
    assert headers["x-step-audio-edits"] == "none" and headers["x-step-audio-iterations"] == "1"
    plain = {"input": TEXT, "voice": "alloy", "response_format": "wav", "step_audio": {"seed": 80}}
    assert speech(http, plain).content == nothing


CHAIN_REFUSALS = [
    ("too many steps", {"edits": [{"mode": "vad"}] * (MAX_STEPS + 1)}, 413, "step_audio.edits"),
    (
        "too much work",
        {"edits": [{"mode": "emotion", "edit_info": "sad", "n_edit_iter": 3}, {"mode": "vad", "n_edit_iter": 2}]},
        413,
        "step_audio.edits",
    ),
    (
        "bad step",
        {"edits": [{"mode": "vad"}, {"mode": "emotion", "edit_info": "whisper"}]},
        400,
        "step_audio.edits[1].edit_info",
    ),
    ("untagged paralinguistic step", {"edits": [{"mode": "paralinguistic"}]}, 400, "step_audio.edits[0].text"),
    ("too many iterations", {"edits": [{"mode": "vad", "n_edit_iter": 9}]}, 400, "step_audio.edits[0].n_edit_iter"),
    ("edits and instructions", {"edits": [{"mode": "vad"}], "instructions": "happy"}, 400, "instructions"),
    ("unknown step field", {"edits": [{"mode": "vad", "pitch": 2}]}, 400, "step_audio.edits[0].pitch"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "fields", "status", "param"), CHAIN_REFUSALS, ids=[c[0] for c in CHAIN_REFUSALS])
def test_a_chain_that_breaks_a_rule_is_refused_before_any_work(
    http: httpx.Client, server: LiveServer, *, case: str, fields: dict, status: int, param: str
) -> None:
    engine = server.app.state.step_audio.engine
    before = engine.generations
    fields = dict(fields)
    instructions = fields.pop("instructions", None)
    # the prompt is not audio: had anything been decoded, the answer would be a 400 about it
    body: dict = {"input": TEXT, "step_audio": {"prompt_text": "a", "prompt_audio_base64": NOT_AUDIO, **fields}}
    if instructions is not None:
        body["instructions"] = instructions
    r = http.post("/v1/audio/speech", json=body)
    assert r.status_code == status, (case, r.text)
    assert r.json()["error"]["param"] == param
    assert engine.generations == before  # no generation step ran


@pytest.mark.parametrize("section", ["## Edit chains", "## `instructions`", "## Inline paralinguistic tags"])
def test_the_documented_curl_examples_work(server: LiveServer, tmp_path: Path, section: str) -> None:
    doc = (REPO / "docs" / "api.md").read_text()
    start = doc.index(section)
    text = doc[start : doc.index("\n## ", start + 1)]
    blocks = re.findall(r"```bash\n(.*?)\n```", text, re.S)
    assert blocks, section
    for block in blocks:
        script = block.replace("http://localhost:8003", server.url).replace(
            "engine/default_voice/voice.wav", str(VOICE_WAV)
        )
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, (block, done.stdout, done.stderr)
        if "| grep" in block:  # the header the example greps for, with the value its comment shows
            shown = re.search(r"# (.+)$", block.splitlines()[-1])
            assert shown is None or shown.group(1).strip() in done.stdout, done.stdout
    for wav in tmp_path.glob("*.wav"):
        y, sr = sf.read(wav)
        assert sr == 24000 and len(y) > 0
