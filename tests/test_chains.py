"""Edit chains without models: the instructions mapping (table), inline tags, step checks, limits, seeds."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest

from engine import chains
from engine.instructions import PHRASES, map_instructions
from engine.types import EDIT_MODES, MAX_SEED, EditStep, Mode
from errors import InvalidInputError, TooLargeError
from llm import prompts

# (instruction, the X-Step-Audio-Edits report it must give): every row is a rule of docs/instructions.md
INSTRUCTIONS = [
    ("Speak in a cheerful tone.", "emotion=happy"),
    ("happy", "emotion=happy"),
    ("Sound joyful and upbeat", "emotion=happy"),
    ("Say it angrily", "emotion=angry"),
    ("You are furious about this", "emotion=angry"),
    ("sad, please", "emotion=sad"),
    ("a melancholy reading", "emotion=sad"),
    ("sound confused", "emotion=confusion"),
    ("scared", "emotion=fear"),
    ("Be surprised!", "emotion=surprised"),
    ("enthusiastic and excited", "emotion=excited"),
    ("cold and distant", "emotion=coldness"),
    ("Read it in a neutral voice", "emotion=remove"),
    ("no emotion at all", "emotion=remove"),
    ("whisper", "style=whisper"),
    ("Whisper it softly", "style=whisper"),
    ("like a news anchor", "style=news"),
    ("Talk like a child", "style=child"),
    ("as a storyteller at bedtime", "style=story"),
    ("shouting", "style=shout"),
    ("theatrical and over the top", "style=exaggerated"),
    ("gentle", "style=gentle"),
    ("Speak quickly", "speed=faster"),
    ("a bit faster", "speed=faster"),
    ("much faster", "speed=more faster"),
    ("very slowly", "speed=more slower"),
    ("Slow down", "speed=slower"),
    ("take your time", "speed=slower"),
    # negations: a speed flips, an emotion or a style is dropped
    ("not too fast", "speed=slower"),
    ("Don't rush.", "speed=slower"),
    ("not too slow", "speed=faster"),
    ("never slowly", "speed=faster"),
    ("not angry", "none"),
    ("don't whisper", "none"),
    ("Without sounding sad, read it warmly", "style=warm"),
    # mixed: one edit per mode, the first mention wins, run in the order emotion, style, speed
    ("Speak in a cheerful tone, a bit faster", "emotion=happy; speed=faster"),
    ("slowly, and sadly", "emotion=sad; speed=slower"),
    ("whisper, but not sad, and much slower", "style=whisper; speed=more slower"),
    ("happy, then angry", "emotion=happy"),
    ("Excited sports commentator, shouting, very fast", "emotion=excited; style=shout; speed=more faster"),
    ("calm and soothing, not too fast", "style=comfort; speed=slower"),
    ("Read the news, not happy, quickly", "style=news; speed=faster"),
    # nothing the model can do: accepted, reported as none
    ("", "none"),
    ("Pronounce every word in British English", "none"),
    ("use a pirate accent", "none"),
    ("SPEAK IN A CHEERFUL TONE", "emotion=happy"),
    ("don\u2019t rush", "speed=slower"),
]


@pytest.mark.parametrize(("instruction", "report"), INSTRUCTIONS, ids=[repr(i) for i, _ in INSTRUCTIONS])
def test_instructions_map_onto_the_edit_vocabulary(instruction: str, report: str) -> None:
    mapped = map_instructions(instruction)
    assert mapped.report == report
    assert map_instructions(instruction) == mapped  # deterministic


def test_the_instruction_table_has_enough_rows_and_every_phrase_maps_into_the_catalogue() -> None:
    assert len(INSTRUCTIONS) >= 30
    assert sum("not" in i.lower() or "n't" in i.lower() or "never" in i.lower() for i, _ in INSTRUCTIONS) >= 6
    for phrase, (mode, value) in PHRASES.items():
        assert value in prompts.EDIT_OPTIONS[mode], phrase


def test_mapped_steps_pass_the_step_check() -> None:
    steps = map_instructions("Excited, whispering, very fast").steps
    assert [chains.check_step(s, max_edit_iter=1) for s in steps] == list(steps)


@pytest.mark.parametrize(
    ("text", "spoken", "tagged"),
    [
        ("Hello [Laughter] world.", "Hello world.", "Hello [Laughter] world."),
        ("[Breathing] Well, [uhm] I see [Sigh].", "Well, I see.", "[Breathing] Well, [Uhm] I see [Sigh]."),
        ("Call [Surprise-oh] me", "Call me", "Call [Surprise-oh] me"),
    ],
)
def test_inline_tags_split_into_spoken_and_tagged_text(text: str, spoken: str, tagged: str) -> None:
    split = chains.split_inline_tags(text)
    assert split is not None and (split.spoken, split.tagged) == (spoken, tagged)


def test_unknown_bracketed_words_stay_text() -> None:
    assert chains.split_inline_tags("Read [chapter 3] aloud [Applause].") is None
    split = chains.split_inline_tags("[chapter 3] made me [Laughter]")
    assert split is not None and split.spoken == "[chapter 3] made me"


@pytest.mark.parametrize(
    ("step", "param"),
    [
        (EditStep("emotion", "whisper"), "edit_info"),
        (EditStep("style"), "edit_info"),
        (EditStep("vad", "happy"), "edit_info"),
        (EditStep("paralinguistic", "laughter", text="Hi [Laughter]"), "edit_info"),
        (EditStep("paralinguistic"), "text"),
        (EditStep("speed", "faster", n_edit_iter=3), "n_edit_iter"),
        (EditStep("shout"), "mode"),  # type: ignore[arg-type]
    ],
)
def test_check_step_names_the_bad_field(step: EditStep, param: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        chains.check_step(step, max_edit_iter=2)
    assert err.value.param == param


def test_check_step_normalises_edit_info() -> None:
    assert chains.check_step(EditStep("speed", " More Faster "), max_edit_iter=1).edit_info == "more faster"


def test_limits_count_steps_and_generations() -> None:
    steps = [EditStep("emotion", "happy", 2), EditStep("vad")]
    assert chains.generations(steps, clone=True) == 4
    chains.check_limits(steps, clone=True, max_steps=2, max_generations=4)
    with pytest.raises(TooLargeError, match="2 edit steps; the limit is 1"):
        chains.check_limits(steps, clone=True, max_steps=1, max_generations=4)
    with pytest.raises(TooLargeError, match="needs 4 generations"):
        chains.check_limits(steps, clone=True, max_steps=2, max_generations=3)


def test_generation_seeds_count_up_and_wrap() -> None:
    assert [chains.generation_seed(10, i) for i in range(3)] == [10, 11, 12]
    assert chains.generation_seed(MAX_SEED, 1) == 0


def test_describe_and_transcript_need() -> None:
    steps = [EditStep("paralinguistic", text="a [Sigh]"), EditStep("speed", "faster", 2), EditStep("denoise")]
    assert chains.describe(steps) == "paralinguistic; speed=faster x2; denoise"
    assert chains.needs_transcript(steps) and not chains.needs_transcript([EditStep("denoise")])


def test_the_documented_phrase_table_is_the_code_table() -> None:
    """docs/instructions.md lists exactly the phrases the mapping uses, under the edit each gives."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "instructions.md").read_text()
    table = doc[doc.index("## Phrase table") :]
    documented = {
        phrase.strip(): tuple(edit.strip("` ").split("=", 1))
        for edit, phrases in re.findall(r"^\| (`[a-z]+=[a-z_ ]+`) \| (.+) \|$", table, re.M)
        for phrase in phrases.split(",")
    }
    assert documented == PHRASES


def test_the_mode_types_are_the_catalogue() -> None:
    assert tuple(prompts.EDIT_OPTIONS) == EDIT_MODES
    assert get_args(Mode) == ("clone", *EDIT_MODES)
