"""OpenAI's free-text ``instructions`` mapped onto the model's own edit vocabulary, deterministically.

The model edits with a closed vocabulary (``llm.prompts``: emotions, styles, speeds). An
instruction is read as plain words, no model involved, so the same text always gives the same
edits and the table in ``docs/instructions.md`` is the whole truth:

1. Lower-case; split into clauses at ``, . ; : ! ?`` and the words *but*, *and*, *then*, *while*.
2. In each clause, find the phrases of ``PHRASES`` (longest first, whole words).
3. A phrase is *negated* when *not*, *no*, *never*, *don't*, *without*, *less* or *nothing*
   stands in the three words before it in its clause. A negated speed flips (*not too fast*:
   slower); a negated emotion or style is dropped (*not angry* asks for nothing we can do).
4. *very*, *much*, *really*, *extremely*, *super*, *way*, *a lot* (two words before) make a
   speed ``more faster`` / ``more slower``.
5. At most one edit per mode, the first one found wins; the edits run in the order
   emotion, style, speed (after the clone).

Phrases that already hold their negation (*no emotion*, *without emotion*) are entries of their
own and map to the model's ``remove``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.chains import describe
from engine.types import EditStep

MODE_ORDER = ("emotion", "style", "speed")
NEGATIONS = frozenset({"not", "no", "never", "dont", "don't", "without", "less", "nothing", "isnt", "isn't"})
INTENSIFIERS = frozenset({"very", "much", "really", "extremely", "super", "way", "lot", "so"})
NEGATION_WINDOW = 3
INTENSIFIER_WINDOW = 2
_FLIP = {"faster": "slower", "slower": "faster", "more faster": "slower", "more slower": "faster"}
_CLAUSE_SPLIT = re.compile(r"[,.;:!?]|\b(?:but|and|then|while)\b")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def _entries(mode: str, value: str, *phrases: str) -> dict[str, tuple[str, str]]:
    return {phrase: (mode, value) for phrase in phrases}


# phrase -> (mode, edit_info); every value is one of llm.prompts' EMOTIONS / STYLES / SPEEDS
PHRASES: dict[str, tuple[str, str]] = {
    **_entries("emotion", "happy", "happy", "happily", "cheerful", "cheerfully", "joyful", "joyfully", "glad",
               "upbeat", "delighted", "cheery", "joyous", "merry"),
    **_entries("emotion", "angry", "angry", "angrily", "furious", "furiously", "mad", "irritated", "annoyed",
               "enraged", "irate"),
    **_entries("emotion", "sad", "sad", "sadly", "sorrowful", "melancholy", "melancholic", "unhappy", "gloomy",
               "mournful", "tearful"),
    **_entries("emotion", "humour", "humorous", "humorously", "funny", "witty", "joking", "jokingly", "humour",
               "humor", "amused"),
    **_entries("emotion", "confusion", "confused", "puzzled", "perplexed", "baffled", "bewildered"),
    **_entries("emotion", "disgusted", "disgusted", "disgust", "revolted", "grossed out", "repulsed"),
    **_entries("emotion", "empathy", "empathetic", "empathic", "empathy", "compassionate", "sympathetic",
               "understanding"),
    **_entries("emotion", "embarrass", "embarrassed", "embarrassment", "awkward", "sheepish"),
    **_entries("emotion", "fear", "afraid", "scared", "fearful", "frightened", "terrified", "fear", "anxious",
               "nervous"),
    **_entries("emotion", "surprised", "surprised", "astonished", "amazed", "shocked", "surprise"),
    **_entries("emotion", "excited", "excited", "excitedly", "enthusiastic", "enthusiastically", "thrilled",
               "energetic", "eager"),
    **_entries("emotion", "depressed", "depressed", "hopeless", "despondent", "miserable"),
    **_entries("emotion", "coldness", "cold", "coldly", "icy", "aloof", "detached", "indifferent", "distant"),
    **_entries("emotion", "admiration", "admiring", "admiringly", "admiration", "impressed", "in awe", "awed"),
    **_entries("emotion", "remove", "neutral", "neutrally", "no emotion", "without emotion", "emotionless",
               "unemotional", "flat", "monotone"),
    **_entries("style", "serious", "serious", "seriously", "solemn", "solemnly", "grave", "earnest"),
    **_entries("style", "arrogant", "arrogant", "arrogantly", "smug", "condescending", "haughty", "cocky"),
    **_entries("style", "child", "child", "childlike", "like a child", "kid", "childish"),
    **_entries("style", "older", "elderly", "old man", "old woman", "older", "aged", "grandfather", "grandmother"),
    **_entries("style", "girl", "girl", "girlish", "young girl"),
    **_entries("style", "pure", "pure", "innocent", "innocently"),
    **_entries("style", "sister", "big sister", "sisterly", "older sister"),
    **_entries("style", "sweet", "sweet", "sweetly"),
    **_entries("style", "ethereal", "ethereal", "dreamy", "airy", "otherworldly"),
    **_entries("style", "whisper", "whisper", "whispering", "whispered", "whispery", "hushed"),
    **_entries("style", "gentle", "gentle", "gently", "soft", "softly", "tender", "tenderly"),
    **_entries("style", "recite", "recite", "reciting", "recitation", "declaim", "declaiming", "poetry"),
    **_entries("style", "generous", "generous", "generously", "magnanimous", "big hearted"),
    **_entries("style", "act_coy", "coy", "coyly", "coquettish", "flirtatious", "flirty", "cutesy"),
    **_entries("style", "warm", "warm", "warmly", "friendly", "kind", "kindly"),
    **_entries("style", "shy", "shy", "shyly", "timid", "timidly", "bashful"),
    **_entries("style", "comfort", "comforting", "soothing", "reassuring", "consoling", "calming"),
    **_entries("style", "authority", "authoritative", "commanding", "authority", "stern", "firm"),
    **_entries("style", "chat", "chatty", "conversational", "casual", "casually", "chatting"),
    **_entries("style", "radio", "radio", "radio host", "broadcaster", "dj"),
    **_entries("style", "soulful", "soulful", "heartfelt", "soulfully"),
    **_entries("style", "story", "storytelling", "storyteller", "story", "narrator", "narrate", "bedtime story"),
    **_entries("style", "vivid", "vivid", "vividly", "lively", "animated"),
    **_entries("style", "program", "program host", "presenter", "tv host", "show host"),
    **_entries("style", "news", "news", "newsreader", "news anchor", "anchor", "reporter"),
    **_entries("style", "advertising", "advertising", "advertisement", "commercial", "sales pitch", "salesy"),
    **_entries("style", "roar", "roar", "roaring", "bellow", "bellowing"),
    **_entries("style", "murmur", "murmur", "murmuring", "mumble", "mumbling", "mutter", "muttering", "quietly"),
    **_entries("style", "shout", "shout", "shouting", "yell", "yelling", "scream", "screaming"),
    **_entries("style", "deeply", "deep", "deeply", "deep voice"),
    **_entries("style", "loudly", "loud", "loudly"),
    **_entries("style", "exaggerated", "exaggerated", "dramatic", "dramatically", "theatrical", "over the top"),
    **_entries("style", "remove", "plain style", "no style", "without style"),
    **_entries("speed", "faster", "fast", "faster", "quickly", "quick", "quicker", "rapidly", "rapid", "briskly",
               "brisk", "hurried", "hurriedly", "rush", "rushed", "speed up", "pick up the pace", "hurry"),
    **_entries("speed", "slower", "slow", "slowly", "slower", "leisurely", "unhurried", "slow down",
               "take your time", "relaxed pace", "drawl"),
}  # fmt: skip
_MAX_PHRASE_WORDS = max(len(p.split()) for p in PHRASES)


@dataclass(frozen=True)
class InstructionEdits:
    """What an instruction maps to: the edit steps to run, and the text reported to the client."""

    steps: tuple[EditStep, ...]

    @property
    def report(self) -> str:
        """``emotion=happy; speed=faster``, or ``none`` when the instruction mapped to nothing."""
        return describe(self.steps)


def _words(clause: str) -> list[str]:
    return [w.replace("'", "") if w in ("don't", "isn't") else w for w in _WORD.findall(clause)]


def map_instructions(text: str) -> InstructionEdits:
    """The edits an instruction asks for, by the rules of the module docstring."""
    chosen: dict[str, str] = {}
    for clause in _CLAUSE_SPLIT.split(text.lower().replace("\u2019", "'")):
        words = _words(clause)
        i = 0
        while i < len(words):
            match = None
            for n in range(min(_MAX_PHRASE_WORDS, len(words) - i), 0, -1):
                phrase = " ".join(words[i : i + n])
                if phrase in PHRASES:
                    match = (n, *PHRASES[phrase])
                    break
            if match is None:
                i += 1
                continue
            n, mode, value = match
            before = words[max(0, i - NEGATION_WINDOW) : i]
            negated = any(w in NEGATIONS for w in before)
            if mode == "speed":
                if any(w in INTENSIFIERS for w in words[max(0, i - INTENSIFIER_WINDOW) : i]) and not negated:
                    value = f"more {value}"
                if negated:
                    value = _FLIP[value]
                chosen.setdefault(mode, value)
            elif not negated:
                chosen.setdefault(mode, value)
            i += n
    return InstructionEdits(tuple(EditStep(mode, chosen[mode]) for mode in MODE_ORDER if mode in chosen))  # type: ignore[arg-type]
