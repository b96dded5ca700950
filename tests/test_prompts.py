"""Clone and edit prompts: exact reference ids, structure on the project tokenizer, validation."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from audio import decode_audio
from bundles.text_tokenizer_bundle import write_text_tokenizer
from errors import InvalidInputError
from llm.prompts import (
    EDIT_OPTIONS,
    PARALINGUISTIC_TAGS,
    PromptPair,
    build_clone_prompt,
    build_edit_prompt,
    catalogue,
    clone_speaker_id,
)
from llm.text_tokenizer import AUDIO_ID_OFFSET, BOS_ID, BOT_ID, EOT_ID, StepTextTokenizer, load_text_tokenizer

AUDIO_CODES = [307, 130, 1751, 2424, 3178, 533, 650, 1935, 1935, 3031]  # 2 groups of vq02, vq02, 3 x vq06
AUDIO_STR = "".join(f"<audio_{n}>" for n in AUDIO_CODES)
TRANSCRIPT = "Please call Stella and ask her to bring these things with her."

# The reference's texts, typed out independently of llm.prompts.
EDIT_SYS = (
    "As a highly skilled audio editing and tuning specialist, you excel in interpreting user instructions and "
    "applying precise adjustments to meet their needs. Your expertise spans a wide range of enhancement "
    "capabilities, including but not limited to:\n# Emotional Enhancement\n# Speaking Style Transfer\n"
    "# Non-linguistic Adjustments\n# Audio Tuning & Editing\nNote: You will receive instructions in natural "
    "language and are expected to accurately interpret and execute the most suitable audio edits and "
    "enhancements.\n"
)
T = TRANSCRIPT
ENSURE = "Ensure that the speech quality remains intact with minimal distortion, and eliminate all"
EDIT_CASES = {
    # name: (mode, edit_info, text, instruction)
    "emotion": ("emotion", "sad", None,
                f"Make the following audio more sad. The text corresponding to the audio is: {T}\n"),
    "emotion_remove": ("emotion", "remove", None,
                       f"Remove any emotion in the following audio and the reference text is: {T}\n"),
    "style": ("style", "whisper", None,
              f"Make the following audio more whisper style. The text corresponding to the audio is: {T}\n"),
    "style_remove": ("style", "remove", None,
                     f"Remove any speaking styles in the following audio and the reference text is: {T}\n"),
    "speed": ("speed", "more faster", None,
              f"Make the following audio more more faster. The text corresponding to the audio is: {T}\n"),
    "paralinguistic": ("paralinguistic", None, "Please [Laughter] call Stella.",
                       "Add some non-verbal sounds to make the audio more natural, the new text is : "
                       f"Please [Laughter] call Stella.\n  The text corresponding to the audio is: {T}\n"),
    "denoise": ("denoise", None, None,
                "Remove any noise from the given audio while preserving the voice content clearly. "
                f"{ENSURE} noise from the audio.\n"),
    "vad": ("vad", None, None,
            "Remove any silent portions from the given audio while preserving the voice content clearly. "
            f"{ENSURE} silence from the audio.\n"),
}  # fmt: skip


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> StepTextTokenizer:
    d = tmp_path_factory.mktemp("editx")
    write_text_tokenizer(d)
    return load_text_tokenizer(d)


def _build_reference_case(tok: StepTextTokenizer, case: dict) -> PromptPair:
    if case["mode"] == "clone":
        return build_clone_prompt(
            tok,
            speaker=case["speaker"],
            prompt_text=case["prompt_text"],
            audio_token_str=case["audio_token_str"],
            target_text=case["target_text"],
        )
    return build_edit_prompt(
        tok,
        mode=case["mode"],
        audio_token_str=case["audio_token_str"],
        edit_info=case.get("edit_info"),
        audio_text=case["audio_text"],
        text=case.get("text"),
    )


# ---- fidelity with the reference (real tokenizer) -------------------------------------------


@pytest.mark.fixtures
def test_fixture_prompt_ids_exact(reference_dir, step1_tokenizer_dir):
    real = load_text_tokenizer(step1_tokenizer_dir)
    cases = json.loads((reference_dir / "prompt_ids" / "prompt_ids.json").read_text())["cases"]
    npz = np.load(reference_dir / "prompt_ids" / "prompt_ids.npz")
    assert {c["name"] for c in cases} == {"clone", "emotion_happy", "paralinguistic", "lm_clone_short"}
    for case in cases:
        ids = _build_reference_case(real, case).cond
        assert ids == case["token_ids"], case["name"]
        np.testing.assert_array_equal(np.asarray(ids), npz[f"{case['name']}__token_ids"])


@pytest.mark.fixtures
def test_shared_reference_prompt_ids_exact(step1_tokenizer_dir):
    real = load_text_tokenizer(step1_tokenizer_dir)
    data = json.loads((step1_tokenizer_dir.parent / "reference-prompt-ids.json").read_text())
    for case in data["cases"]:
        assert _build_reference_case(real, case).cond == case["token_ids"], case["name"]


@pytest.mark.fixtures
def test_speaker_id_of_the_fixture_wav(reference_dir):
    cases = json.loads((reference_dir / "prompt_ids" / "prompt_ids.json").read_text())["cases"]
    case = next(c for c in cases if c["name"] == "clone")
    wav, _ = decode_audio((reference_dir / "inputs" / "a_piper_en_22k.wav").read_bytes())
    assert clone_speaker_id(case["prompt_text"], wav) == case["speaker"] == "clone_6cd09f8632d901e8"


# ---- speaker id rule ------------------------------------------------------------------------


def test_speaker_id_hashes_text_and_first_last_1000_raw_samples():
    rng = np.random.default_rng(0)
    stereo = rng.uniform(-1, 1, size=(2, 3000)).astype(np.float32)
    flat = stereo.reshape(-1)  # channel-major
    want = hashlib.sha256(b"hi" + flat[:1000].astype("<f4").tobytes() + flat[-1000:].astype("<f4").tobytes())
    assert clone_speaker_id("hi", stereo) == "clone_" + want.hexdigest()[:16]
    assert clone_speaker_id("hi", torch.from_numpy(stereo)) == clone_speaker_id("hi", stereo)
    short = stereo[:, :1000]  # 2000 values: all of them enter the hash
    want = hashlib.sha256("hé".encode() + short.reshape(-1).astype("<f4").tobytes()).hexdigest()
    assert clone_speaker_id("hé", short) == "clone_" + want[:16]
    middle_changed = stereo.copy()
    middle_changed[0, 1500] += 0.5  # a sample outside the hashed ends
    assert clone_speaker_id("hi", middle_changed) == clone_speaker_id("hi", stereo)
    assert clone_speaker_id("ho", stereo) != clone_speaker_id("hi", stereo)


# ---- exact structure on the project tokenizer -----------------------------------------------


def _expected(tok: StepTextTokenizer, system: str, human: list[int]) -> list[int]:
    system_ids = tok.encode("system\n" + system)
    return [1, 4, *system_ids, 3, 4, *tok.encode("human\n"), *human, 3, 4, *tok.encode("assistant\n")]


def _check_turn_layout(ids: list[int]) -> None:
    """Three turns: BOS, then BOT opening each turn, EOT closing the first two, BOS after each BOT."""
    bots = [i for i, t in enumerate(ids) if t == BOT_ID]
    eots = [i for i, t in enumerate(ids) if t == EOT_ID]
    assert ids[0] == BOS_ID and bots[0] == 1 and len(bots) == 3 and len(eots) == 2
    assert eots[0] + 1 == bots[1] and eots[1] + 1 == bots[2]
    assert all(ids[b + 1] == BOS_ID for b in bots)


def _audio_ids(ids: list[int]) -> list[int]:
    return [t for t in ids if t >= AUDIO_ID_OFFSET]


@pytest.mark.parametrize("name", list(EDIT_CASES))
def test_edit_prompt_exact_ids(tok, name):
    mode, info, text, instruction = EDIT_CASES[name]
    pair = build_edit_prompt(
        tok, mode=mode, audio_token_str=f" {AUDIO_STR}\n", edit_info=info, audio_text=f"  {TRANSCRIPT} ", text=text
    )
    cond, uncond = pair.cond, pair.uncond
    assert cond == _expected(tok, EDIT_SYS, tok.encode(instruction + "\n" + AUDIO_STR + "\n"))
    _check_turn_layout(cond)
    # audio ids: the codes in order, contiguous, right after the blank line
    a0 = cond.index(AUDIO_ID_OFFSET + AUDIO_CODES[0])
    assert cond[a0 : a0 + len(AUDIO_CODES)] == [AUDIO_ID_OFFSET + n for n in AUDIO_CODES]
    assert _audio_ids(cond) == [AUDIO_ID_OFFSET + n for n in AUDIO_CODES]
    assert cond[a0 - 2 : a0] == [78, 78] and cond[a0 + len(AUDIO_CODES)] == 78
    # the human turn decodes back to the instruction, the audio string, newlines
    human_start = cond.index(BOT_ID, 2) + 1 + len(tok.encode("human\n"))
    human = cond[human_start : cond.index(EOT_ID, human_start)]
    assert human[0] == BOS_ID  # the instruction is its own encode() call
    assert tok.decode(human) == instruction + "\n" + AUDIO_STR + "\n"
    # unconditional: same template, instruction removed, audio kept
    assert uncond == _expected(tok, EDIT_SYS, tok.encode("\n" + AUDIO_STR + "\n"))
    _check_turn_layout(uncond)
    assert _audio_ids(uncond) == _audio_ids(cond)
    assert cond[: cond.index(EOT_ID)] == uncond[: uncond.index(EOT_ID)]  # system turn identical
    assert len(uncond) < len(cond)


def test_clone_prompt_exact_ids(tok):
    speaker = "clone_0123456789abcdef"
    target = "Good morning, it is a lovely day."
    pair = build_clone_prompt(
        tok, speaker=speaker, prompt_text=TRANSCRIPT, audio_token_str=AUDIO_STR, target_text=target
    )
    system = (
        "Generate audio with the following timbre, prosody and speaking style\n\n[speaker_start]\n"
        f"speaker name: {speaker}\nspeaker prompt text: \n{TRANSCRIPT}\nspeaker audio tokens: \n"
        f"{AUDIO_STR}\n[speaker_end]\n"
    )
    continuation = tok.encode("\n" + target)[3:]  # enc("\n") is 3 ids: <s> ▁ <0x0A>
    assert continuation[0] != 324 and tok.decode(continuation) == target
    assert pair.cond == _expected(tok, system, continuation)
    _check_turn_layout(pair.cond)
    assert _audio_ids(pair.cond) == [AUDIO_ID_OFFSET + n for n in AUDIO_CODES]
    # the human turn has no BOS of its own: the continuation slicing removed it
    human_start = pair.cond.index(BOT_ID, 2)
    assert pair.cond[human_start : human_start + 4] == [BOT_ID, BOS_ID, *tok.encode("human\n")[1:]]
    assert BOS_ID not in pair.cond[human_start + 2 : pair.cond.index(EOT_ID, human_start)]
    # unconditional: the speaker section (name, transcript, audio tokens) is gone, the target stays
    header = "Generate audio with the following timbre, prosody and speaking style\n"
    assert pair.uncond == _expected(tok, header, continuation)
    assert not _audio_ids(pair.uncond)
    assert "speaker" not in tok.decode(pair.uncond) and target in tok.decode(pair.uncond)


# ---- validation -----------------------------------------------------------------------------


def _edit(tok, **kw):
    args = {"mode": "emotion", "audio_token_str": AUDIO_STR, "edit_info": "happy", "audio_text": TRANSCRIPT}
    return build_edit_prompt(tok, **{**args, **kw})


def test_edit_info_is_validated_per_mode(tok):
    with pytest.raises(InvalidInputError, match=r"allowed: happy, angry.*admiration, remove") as err:
        _edit(tok, edit_info="sleepy")
    assert err.value.param == "edit_info"
    with pytest.raises(InvalidInputError, match="missing; allowed: faster, slower, more faster, more slower"):
        _edit(tok, mode="speed", edit_info=None)
    with pytest.raises(InvalidInputError, match="whisper") as err:
        _edit(tok, mode="emotion", edit_info="whisper")  # a style, not an emotion
    assert err.value.param == "edit_info"
    for mode in ("denoise", "vad", "paralinguistic"):
        with pytest.raises(InvalidInputError, match="takes no edit_info") as err:
            _edit(tok, mode=mode, edit_info="happy", text="x")
        assert err.value.param == "edit_info"
    with pytest.raises(InvalidInputError, match="unknown edit mode") as err:
        _edit(tok, mode="clone")
    assert err.value.param == "mode"
    # spelling is forgiving about case and surrounding spaces; "remove" exists for both lists
    assert _edit(tok, edit_info=" Happy ").cond == _edit(tok, edit_info="happy").cond
    assert _edit(tok, mode="style", edit_info="remove").cond != _edit(tok, mode="emotion", edit_info="remove").cond


def test_required_texts_per_mode(tok):
    for mode, info in (("emotion", "happy"), ("style", "warm"), ("speed", "slower")):
        with pytest.raises(InvalidInputError) as err:
            _edit(tok, mode=mode, edit_info=info, audio_text="  ")
        assert err.value.param == "audio_text"
    with pytest.raises(InvalidInputError) as err:
        _edit(tok, mode="paralinguistic", edit_info=None, text=None)
    assert err.value.param == "text"
    for mode in ("denoise", "vad"):  # no transcript needed, and none enters the prompt
        assert (
            _edit(tok, mode=mode, edit_info=None, audio_text=None).cond
            == _edit(tok, mode=mode, edit_info=None, audio_text="ignored").cond
        )
    with pytest.raises(InvalidInputError) as err:
        build_clone_prompt(tok, speaker="s", prompt_text="", audio_token_str=AUDIO_STR, target_text="x")
    assert err.value.param == "prompt_text"
    with pytest.raises(InvalidInputError) as err:
        build_clone_prompt(tok, speaker="s", prompt_text="x", audio_token_str=AUDIO_STR, target_text=" ")
    assert err.value.param == "text"


def test_texts_cannot_inject_audio_tokens_and_audio_must_exist(tok):
    with pytest.raises(InvalidInputError, match="<audio_N>") as err:
        _edit(tok, audio_text="hello <audio_12> there")
    assert err.value.param == "audio_text"
    with pytest.raises(InvalidInputError) as err:
        build_clone_prompt(tok, speaker="s", prompt_text="x", audio_token_str=AUDIO_STR, target_text="<audio_1>")
    assert err.value.param == "text"
    with pytest.raises(InvalidInputError, match="no audio tokens") as err:
        _edit(tok, audio_token_str="")
    assert err.value.param == "audio"


def test_catalogue_for_tags_endpoint():
    cat = catalogue()
    assert set(cat) == set(EDIT_OPTIONS) == {"emotion", "style", "speed", "paralinguistic", "denoise", "vad"}
    assert "remove" in cat["emotion"] and "remove" in cat["style"] and "act_coy" in cat["style"]
    assert len(cat["emotion"]) == 15 and len(cat["style"]) == 33
    assert cat["speed"] == ["faster", "slower", "more faster", "more slower"]
    assert cat["paralinguistic"] == list(PARALINGUISTIC_TAGS) and "[Laughter]" in cat["paralinguistic"]
    assert cat["denoise"] == cat["vad"] == []
    cat["emotion"].append("mutated")  # a copy: callers cannot change the catalogue
    assert "mutated" not in catalogue()["emotion"]
