"""Edit chains: a clone (or a given audio) followed by edits, each on the previous output.

Everything here is plain data and runs before any model work, so a request that breaks a rule
is refused before its first generation:

* ``check_step`` is the one check of a step against the catalogue (``llm.prompts``) and the
  iteration limit; the HTTP layer and the engine's entry points both call it.
* ``check_limits`` bounds a chain's length and its total number of generations. A paralinguistic
  step counts one step per tag its text holds (at least one): each tag is an edit the request asks
  for, though one generation realises them all, so inline tags cannot stretch a chain past the limit.
* ``split_inline_tags`` turns a clone text holding paralinguistic tags (``[Laughter]``) into the
  text to speak (tags removed) and the tagged text a paralinguistic step then realises.
* ``generation_seed``: generation *i* of a request (0 = the first one: the clone, or the first
  iteration of the first edit; every edit iteration counts) uses ``seed + i``. So a chain equals
  the same requests made by hand, each given the seed of its first generation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from engine.types import MAX_SEED, EditStep
from errors import InvalidInputError, TooLargeError
from llm import prompts

_BRACKETED = re.compile(r"\[([^\[\]]{1,40})\]")
_TAGS = {tag[1:-1].lower(): tag for tag in prompts.PARALINGUISTIC_TAGS}


@dataclass(frozen=True)
class InlineTags:
    """A clone text split for a tag-realising chain: ``spoken`` (tags removed) and ``tagged``."""

    spoken: str
    tagged: str


def check_step(step: EditStep, *, max_edit_iter: int) -> EditStep:
    """The step with its ``edit_info`` normalised; ``InvalidInputError`` naming the step's field."""
    info = prompts.check_edit_info(step.mode, step.edit_info)
    if not 1 <= step.n_edit_iter <= max_edit_iter:
        raise InvalidInputError(
            f"n_edit_iter must be between 1 and {max_edit_iter}, got {step.n_edit_iter}", param="n_edit_iter"
        )
    if step.mode in prompts.NEEDS_TEXT and not (step.text or "").strip():
        raise InvalidInputError(
            f"a {step.mode} step needs the new transcript with inline tags such as [Laughter]", param="text"
        )
    return replace(step, edit_info=info)


def generations(steps: Sequence[EditStep], *, clone: bool) -> int:
    """How many LLM generations a chain runs: the clone (if any) plus every edit iteration."""
    return int(clone) + sum(step.n_edit_iter for step in steps)


def count_tags(text: str | None) -> int:
    """How many paralinguistic tags ``text`` holds (matched as ``split_inline_tags`` matches them)."""
    return sum(1 for m in _BRACKETED.finditer(text or "") if m.group(1).strip().lower() in _TAGS)


def chain_length(steps: Sequence[EditStep]) -> int:
    """A chain's length for ``check_limits``: one per step, a paralinguistic step one per tag (at least one)."""
    return sum(max(1, count_tags(step.text)) if step.mode == "paralinguistic" else 1 for step in steps)


def check_limits(steps: Sequence[EditStep], *, clone: bool, max_steps: int, max_generations: int) -> None:
    """Refuse (``TooLargeError``) a chain longer than ``max_steps`` edits or with too much work."""
    length = chain_length(steps)
    if length > max_steps:
        counted = " (each paralinguistic tag counts as one)" if length != len(steps) else ""
        raise TooLargeError(f"the chain has {length} edit steps{counted}; the limit is {max_steps}", param="edits")
    total = generations(steps, clone=clone)
    if total > max_generations:
        raise TooLargeError(
            f"the chain needs {total} generations (the clone and every edit iteration); the limit is {max_generations}",
            param="edits",
        )


def needs_transcript(steps: Sequence[EditStep]) -> bool:
    """Whether a chain on given audio needs that audio's transcript: some step's instruction names it.

    Paralinguistic names it too and hands its tagged text to the steps after it, so no later step
    needs Whisper when the first audio has its transcript.
    """
    return any(step.mode in prompts.NEEDS_AUDIO_TEXT for step in steps)


def describe(steps: Sequence[EditStep]) -> str:
    """``emotion=happy; paralinguistic; speed=faster x2`` (``none`` for no steps): what a chain applies."""
    parts = []
    for step in steps:
        part = f"{step.mode}={step.edit_info}" if step.edit_info else step.mode
        parts.append(part + (f" x{step.n_edit_iter}" if step.n_edit_iter > 1 else ""))
    return "; ".join(parts) or "none"


def generation_seed(seed: int, index: int) -> int:
    """The seed of a request's generation ``index`` (0-based, see the module docstring)."""
    return (seed + index) % (MAX_SEED + 1)


def split_inline_tags(text: str) -> InlineTags | None:
    """``text`` without its paralinguistic tags, and with them (canonical spelling); None if it has none.

    Tags match case-insensitively (``[laughter]`` is ``[Laughter]``); other bracketed words stay
    text. Removing a tag joins the words around it with one space.
    """
    found = False

    def canonical(match: re.Match[str]) -> str:
        nonlocal found
        tag = _TAGS.get(match.group(1).strip().lower())
        if tag is None:
            return match.group(0)
        found = True
        return tag

    tagged = _BRACKETED.sub(canonical, text)
    if not found:
        return None
    spoken = _BRACKETED.sub(lambda m: " " if m.group(1).strip().lower() in _TAGS else m.group(0), text)
    spoken = re.sub(r"[ \t]+", " ", spoken)
    spoken = re.sub(r" +([,.!?;:])", r"\1", spoken).strip()
    return InlineTags(spoken=spoken, tagged=tagged)
