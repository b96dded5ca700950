"""Step1 prompts for clone and every edit mode, token for token as the reference builds them.

The reference never renders a chat string: it concatenates special ids and several separate
``tokenizer.encode`` calls, each of which prepends BOS (1) and SentencePiece's dummy-prefix ``▁``.
We reproduce that piecewise encoding exactly (docs/model.md §3.3, §5)::

    edit:  [1] + [4] + enc("system\\n" + EDIT_SYSTEM_PROMPT) + [3]
           + [4] + enc("human\\n") + enc(INSTR + "\\n" + AUDIO.strip() + "\\n") + [3]
           + [4] + enc("assistant\\n")
    clone: [1] + [4] + enc("system\\n" + CLONE_SYS(speaker, prompt_text, AUDIO)) + [3]
           + [4] + enc("human\\n") + enc("\\n" + target)[len(enc("\\n")):] + [3]
           + [4] + enc("assistant\\n")

Every builder also returns the *unconditional* prompt that classifier-free guidance
(``intensity``) contrasts with, built with the same template so only the conditioning differs:

* edit: the instruction is removed and everything else stays. The human turn is
  ``enc("\\n" + AUDIO.strip() + "\\n")``, i.e. the template with INSTR = "" (the audio tokens
  to edit, the system prompt and the role markers are unchanged). The transcript goes with the
  instruction, since it is part of it.
* clone: the speaker section is removed from the system prompt, i.e. the blank line and the
  ``[speaker_start]`` .. ``[speaker_end]`` block holding the speaker name, the prompt transcript
  and the prompt audio tokens. The system text is just ``CLONE_SYSTEM_HEADER``; the human turn
  (the target text) is unchanged.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np
import torch

from errors import InvalidInputError
from llm.text_tokenizer import BOS_ID, BOT_ID, EOT_ID, StepTextTokenizer

EDIT_SYSTEM_PROMPT = (
    "As a highly skilled audio editing and tuning specialist, you excel in interpreting user instructions"
    " and applying precise adjustments to meet their needs. Your expertise spans a wide range of"
    " enhancement capabilities, including but not limited to:\n"
    "# Emotional Enhancement\n"
    "# Speaking Style Transfer\n"
    "# Non-linguistic Adjustments\n"
    "# Audio Tuning & Editing\n"
    "Note: You will receive instructions in natural language and are expected to accurately interpret"
    " and execute the most suitable audio edits and enhancements.\n"
)

CLONE_SYSTEM_HEADER = "Generate audio with the following timbre, prosody and speaking style\n"
# The trailing spaces after "text:" and "tokens:" are the reference's; they tokenise as "▁".
CLONE_SPEAKER_SECTION = (
    "\n[speaker_start]\n"
    "speaker name: {speaker}\n"
    "speaker prompt text: \n"
    "{prompt_text}\n"
    "speaker audio tokens: \n"
    "{prompt_wav_tokens}\n"
    "[speaker_end]\n"
)
CLONE_SYSTEM_PROMPT_TEMPLATE = CLONE_SYSTEM_HEADER + CLONE_SPEAKER_SECTION

EMOTIONS = (
    "happy", "angry", "sad", "humour", "confusion", "disgusted", "empathy", "embarrass", "fear",
    "surprised", "excited", "depressed", "coldness", "admiration", "remove",
)  # fmt: skip
STYLES = (
    "serious", "arrogant", "child", "older", "girl", "pure", "sister", "sweet", "ethereal", "whisper",
    "gentle", "recite", "generous", "act_coy", "warm", "shy", "comfort", "authority", "chat", "radio",
    "soulful", "story", "vivid", "program", "news", "advertising", "roar", "murmur", "shout", "deeply",
    "loudly", "remove", "exaggerated",
)  # fmt: skip
SPEEDS = ("faster", "slower", "more faster", "more slower")
PARALINGUISTIC_TAGS = (
    "[Breathing]", "[Laughter]", "[Surprise-oh]", "[Confirmation-en]", "[Uhm]", "[Surprise-ah]",
    "[Surprise-wa]", "[Sigh]", "[Question-ei]", "[Dissatisfaction-hnn]",
)  # fmt: skip

# mode -> the edit_info values it accepts (empty: the mode takes no edit_info)
EDIT_OPTIONS: dict[str, tuple[str, ...]] = {
    "emotion": EMOTIONS,
    "style": STYLES,
    "speed": SPEEDS,
    "paralinguistic": (),
    "denoise": (),
    "vad": (),
}
NEEDS_AUDIO_TEXT = frozenset({"emotion", "style", "speed", "paralinguistic"})  # the transcript is in INSTR
NEEDS_TEXT = frozenset({"paralinguistic"})  # the new transcript with inline tags

DENOISE_INSTRUCTION = (
    "Remove any noise from the given audio while preserving the voice content clearly. Ensure that the"
    " speech quality remains intact with minimal distortion, and eliminate all noise from the audio.\n"
)
VAD_INSTRUCTION = (
    "Remove any silent portions from the given audio while preserving the voice content clearly. Ensure"
    " that the speech quality remains intact with minimal distortion, and eliminate all silence from the"
    " audio.\n"
)

SPEAKER_ID_PREFIX = "clone_"
SPEAKER_HASH_SAMPLES = 1000  # first and last samples of the raw wav that enter the speaker hash
SPEAKER_HASH_HEX = 16

_AUDIO_TOKEN_RE = re.compile(r"<audio_\d+>")


@dataclass(frozen=True)
class PromptPair:
    """A prompt's conditional ids (the reference prompt) and its unconditional twin for guidance."""

    cond: list[int]
    uncond: list[int]


def catalogue() -> dict[str, list[str]]:
    """What ``GET /v1/tags`` lists: per edit mode its ``edit_info`` values.

    ``paralinguistic`` takes no ``edit_info``; its list holds the tags to write inline in the new
    transcript (``text``). ``denoise`` and ``vad`` take nothing.
    """
    out = {mode: list(options) for mode, options in EDIT_OPTIONS.items()}
    out["paralinguistic"] = list(PARALINGUISTIC_TAGS)
    return out


def clone_speaker_id(prompt_text: str, raw_wav: np.ndarray | torch.Tensor) -> str:
    """The reference's speaker name: ``clone_`` + sha256(text ‖ raw samples)[:16].

    ``raw_wav`` is the loaded audio before any mono mix or peak limit, shaped ``(channels, n)``
    (PCM16 / 32768 for WAV input, as ``audio.decode_audio`` returns). Its float32 little-endian
    bytes, flattened channel-major, enter the hash: the first and last 1000 values, or all of
    them when there are at most 2000.
    """
    if isinstance(raw_wav, torch.Tensor):
        raw_wav = raw_wav.detach().cpu().numpy()
    flat = np.ascontiguousarray(np.asarray(raw_wav, dtype="<f4").reshape(-1))
    if flat.size > 2 * SPEAKER_HASH_SAMPLES:
        flat = np.concatenate([flat[:SPEAKER_HASH_SAMPLES], flat[-SPEAKER_HASH_SAMPLES:]])
    digest = hashlib.sha256(prompt_text.encode("utf-8") + flat.tobytes()).hexdigest()
    return SPEAKER_ID_PREFIX + digest[:SPEAKER_HASH_HEX]


def _check_text(value: str | None, param: str, *, required: bool) -> str | None:
    """Refuse a missing required text and any text that would inject ``<audio_N>`` tokens."""
    if value is not None and not isinstance(value, str):
        raise InvalidInputError(f"{param} must be a string", param=param)
    if value is None or not value.strip():
        if required:
            raise InvalidInputError(f"{param} is required and must not be empty", param=param)
        return None
    if _AUDIO_TOKEN_RE.search(value):
        raise InvalidInputError(f"{param} must not contain <audio_N> token strings", param=param)
    return value


def _check_audio_tokens(audio_token_str: str) -> str:
    if not audio_token_str or not _AUDIO_TOKEN_RE.search(audio_token_str):
        raise InvalidInputError("the audio produced no audio tokens (too short or silent)", param="audio")
    return audio_token_str


def check_edit_info(mode: str, edit_info: str | None) -> str | None:
    """The one check of ``mode`` and ``edit_info`` against the catalogue; the normalised ``edit_info``.

    Raises ``InvalidInputError`` naming the offending parameter and the values ``mode`` allows.
    """
    if mode not in EDIT_OPTIONS:
        raise InvalidInputError(f"unknown edit mode {mode!r}; allowed: {', '.join(EDIT_OPTIONS)}", param="mode")
    allowed = EDIT_OPTIONS[mode]
    info = edit_info.strip().lower() if isinstance(edit_info, str) else edit_info
    if allowed:
        if info not in allowed:
            got = "missing" if not info else f"{edit_info!r} is not allowed"
            raise InvalidInputError(
                f"edit_info for mode {mode!r}: {got}; allowed: {', '.join(allowed)}", param="edit_info"
            )
        return info
    if info:
        hint = " (write the tags inline in the new transcript)" if mode in NEEDS_TEXT else ""
        raise InvalidInputError(
            f"mode {mode!r} takes no edit_info (got {edit_info!r}){hint}; allowed: none", param="edit_info"
        )
    return None


def validate_edit(
    mode: str, edit_info: str | None = None, audio_text: str | None = None, text: str | None = None
) -> str | None:
    """Check one edit request (catalogue and texts); return the normalised ``edit_info``."""
    info = check_edit_info(mode, edit_info)
    _check_text(audio_text, "audio_text", required=mode in NEEDS_AUDIO_TEXT)
    _check_text(text, "text", required=mode in NEEDS_TEXT)
    return info


def edit_instruction(
    mode: str, edit_info: str | None = None, audio_text: str | None = None, text: str | None = None
) -> str:
    """The reference's instruction (INSTR) for an edit, validated first; always ends in ``"\\n"``.

    ``speed`` reuses the emotion wording, so ``more faster`` reads "more more faster", as upstream.
    """
    info = validate_edit(mode, edit_info, audio_text, text)
    t = audio_text.strip() if audio_text else ""
    if mode in ("emotion", "speed"):
        if info == "remove":
            return f"Remove any emotion in the following audio and the reference text is: {t}\n"
        return f"Make the following audio more {info}. The text corresponding to the audio is: {t}\n"
    if mode == "style":
        if info == "remove":
            return f"Remove any speaking styles in the following audio and the reference text is: {t}\n"
        return f"Make the following audio more {info} style. The text corresponding to the audio is: {t}\n"
    if mode == "denoise":
        return DENOISE_INSTRUCTION
    if mode == "vad":
        return VAD_INSTRUCTION
    # paralinguistic: the space before the colon and the two spaces before "The" are upstream's
    return (
        f"Add some non-verbal sounds to make the audio more natural, the new text is : {text}\n"
        f"  The text corresponding to the audio is: {t}\n"
    )


def _turns(tok: StepTextTokenizer, system_text: str, human_ids: list[int]) -> list[int]:
    """``[1] [4] enc(system) [3] [4] enc(human\\n) human_ids [3] [4] enc(assistant\\n)``."""
    system = [BOT_ID, *tok.encode("system\n" + system_text), EOT_ID]
    human = [BOT_ID, *tok.encode("human\n"), *human_ids, EOT_ID]
    return [BOS_ID, *system, *human, BOT_ID, *tok.encode("assistant\n")]


def build_edit_prompt(
    tok: StepTextTokenizer,
    *,
    mode: str,
    audio_token_str: str,
    edit_info: str | None = None,
    audio_text: str | None = None,
    text: str | None = None,
) -> PromptPair:
    """Ids of an edit prompt and of its instruction-free twin (see the module docstring)."""
    instruction = edit_instruction(mode, edit_info, audio_text, text)
    audio = _check_audio_tokens(audio_token_str).strip()
    cond = _turns(tok, EDIT_SYSTEM_PROMPT, tok.encode(instruction + "\n" + audio + "\n"))
    uncond = _turns(tok, EDIT_SYSTEM_PROMPT, tok.encode("\n" + audio + "\n"))
    return PromptPair(cond=cond, uncond=uncond)


def continuation_ids(tok: StepTextTokenizer, text: str) -> list[int]:
    """``text`` tokenised as a continuation: ``enc("\\n" + text)`` minus the ids of ``enc("\\n")``.

    This drops BOS, the dummy-prefix ``▁`` and the newline, so the text gets no leading ``▁``.
    """
    return tok.encode("\n" + text)[len(tok.encode("\n")) :]


def build_clone_prompt(
    tok: StepTextTokenizer,
    *,
    speaker: str,
    prompt_text: str,
    audio_token_str: str,
    target_text: str,
) -> PromptPair:
    """Ids of a clone prompt and of its speaker-free twin (see the module docstring).

    ``prompt_text`` and ``target_text`` are used verbatim (the reference strips neither);
    ``audio_token_str`` is the prompt audio's ``<audio_N>`` string; ``speaker`` usually comes
    from ``clone_speaker_id``.
    """
    _check_text(prompt_text, "prompt_text", required=True)
    _check_text(target_text, "text", required=True)
    _check_audio_tokens(audio_token_str)
    system = CLONE_SYSTEM_PROMPT_TEMPLATE.format(
        speaker=speaker, prompt_text=prompt_text, prompt_wav_tokens=audio_token_str
    )
    human = continuation_ids(tok, target_text)
    return PromptPair(cond=_turns(tok, system, human), uncond=_turns(tok, CLONE_SYSTEM_HEADER, human))
