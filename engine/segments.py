"""Long text cut into segments that Step1 speaks well, at the most natural places that fit.

Step1 was trained on utterances of up to about 30 s, and one generation stops at 8192 ids,
prompt included, so a 4096-character input must be spoken as several generations. Where the
text is cut decides how the seams sound: between sentences the model pauses anyway, between
clauses a pause is acceptable, between words it is audible, and inside a word it is plainly
wrong. ``split_text`` therefore takes, for each segment, the longest stretch that fits the
token bound and ends it at the best kind of place inside it, the latest of that kind:

0. a sentence end (``split_sentences``: ``. ! ? ;`` and ``。！？；…``, with the English
   abbreviation, number and quotation rules below), or a blank line;
1. a clause end: ``, :`` before a space, ``，、：``, em dashes, an ellipsis or an exclamation
   that does not end its sentence, a line break;
2. a space, or either side of an inline tag;
3. anywhere between two characters: only a run with no space or punctuation (a CJK clause, a
   4096-character string) gets here, and it is cut at the bound.

An inline tag (``[Laughter]``, a dialect tag, any ``[...]`` of at most 40 characters) is never
cut, so a segment holds the whole tag the model was told about. Offsets into the input travel
with every segment so that captions and streamed chunks can be matched to the text later.

The bound is in LLM text tokens, not characters: Chinese costs about three times more tokens
per character than English, and tokens, not characters, are what the model reads. Counting is
exact: the function finds the longest fitting prefix by counting growing prefixes (doubling,
then bisection), so each segment costs about ten tokenizer calls on at most twice its own
length, which is linear in the input (a 4096-character text is a few milliseconds with the
SentencePiece tokenizer); every emitted segment is counted once more as it is, so the bound
holds for ``count_tokens(segment.text)`` itself, not for a sum of parts.

English sentence ends are found by our own rules rather than pysbd: on the gold corpus in
``tests/data/sentence-boundaries.txt`` pysbd is not more accurate on English, misses most
Chinese conventions (a boundary after a closing quotation mark, ``；``, ``……``), and takes
10-20 ms per 4096 characters where these rules take under one (docs/long-text.md, "How text is cut").
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

# Audio ids per second of speech: 5 ids (2 vq02 + 3 vq06 codes) per 0.12 s group (docs/model.md §2.5).
AUDIO_IDS_PER_SECOND = 5 / 0.12  # 41.67
# Step1 text tokens per second of speech, measured with the public Step1 tokenizer on narrative
# prose read at typical rates (docs/long-text.md): English 0.24 tokens/char (1.35 per word) at
# 2.5-3 words/s gives 3.4-4.0; Chinese 0.78 tokens/character (punctuation included) at 4-5
# characters/s gives 3.1-3.9. Number- and abbreviation-heavy English reaches about 4.9.
SLOWEST_TOKENS_PER_SECOND = 3.1
# The longest segment, in text tokens: about 22 s of speech at a middle 3.7 tokens/s, 26 s at the
# slowest rate above, still under 30 s for a voice as slow as 2.7 tokens/s (3.5 Chinese
# characters/s). Its audio, 80 / 3.1 s * 41.67 = about 1080 ids, with a clone prompt of at most
# about 1500 ids (a 30 s prompt is 1250 audio ids), stays far below the 8192-id generation limit.
MAX_SEGMENT_TOKENS = 80
# "[Laughter]", "[Sichuanese]", any bracketed run of at most 40 characters on one line
MAX_TAG_CHARS = 40
# One tag; engine.normalize builds its regex from this too, so both agree on what a tag is.
TAG_PATTERN = rf"\[[^\[\]\n]{{1,{MAX_TAG_CHARS - 2}}}\]"
_TAG = re.compile(TAG_PATTERN)

# Cut-point levels, best first; a segment ends at the latest cut of the best level that fits.
SENTENCE, CLAUSE, WORD = 0, 1, 2

_CJK_STOPS = frozenset("。！？；｡")
_LATIN_STRONG = frozenset("!?‼⁇⁈⁉")
_STOP_RUN = re.compile(r"[.!?;。！？；｡…‼⁇⁈⁉]+")
_CLOSERS = "\"'”’)]）】」』》〉»›"
_OPENERS = "\"'“‘([{（【「『《〈«‹¿¡"
_CLAUSE = re.compile(r"(?:[,:](?=[" + re.escape(_CLOSERS) + r"]*\s)|[，、：﹐﹑]+|—+)[" + re.escape(_CLOSERS) + "]*")
_WHITESPACE_RUN = re.compile(r"\s+")
_PARAGRAPH = re.compile(r"\n[^\S\n]*\n")
_DOTTED = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")  # U.S, e.g, p.m, U.S.A

# Abbreviations (lower case, without the final dot). A title or "e.g." never ends a sentence.
_CONTINUING = frozenset((
    "mr", "mrs", "ms", "mx", "dr", "prof", "st", "mt", "ft", "gen", "col", "maj", "capt", "lt", "sgt", "cmdr",
    "adm", "rev", "hon", "gov", "sen", "rep", "pres", "supt", "messrs", "mme", "mlle", "e.g", "i.e", "cf",
    "vs", "viz", "approx", "ca",
))  # fmt: skip
# Before a number these continue the sentence ("No. 7", "Fig. 3", "ext. 4412"); else they are words.
_NUMBERING = frozenset((
    "no", "nos", "nr", "fig", "figs", "ext", "vol", "vols", "p", "pp", "ch", "chap", "sec", "art", "ref", "eq",
    "tel", "op",
))  # fmt: skip
# These end a sentence only where a common sentence opener follows ("... Acme Inc. The firm").
_AMBIGUOUS = frozenset((
    "etc", "al", "inc", "ltd", "co", "corp", "llc", "plc", "bros", "jr", "sr", "esq", "dept", "univ", "assn",
    "est", "ph.d", "hr", "hrs", "min", "max",
))  # fmt: skip
# Month and weekday abbreviations count only capitalised: "sat", "sun" and "dec" are words too.
_AMBIGUOUS_CASED = frozenset((
    "Jan", "Feb", "Mar", "Apr", "Jun", "Jul", "Aug", "Sep", "Sept", "Oct", "Nov", "Dec", "Mon", "Tue", "Tues",
    "Wed", "Thu", "Thur", "Thurs", "Fri", "Sat", "Sun",
))  # fmt: skip
_OPENER_WORDS = frozenset((
    "a", "an", "the", "this", "that", "these", "those", "there", "here", "then", "thus", "so", "but", "and",
    "or", "yet", "nor", "if", "when", "while", "after", "before", "since", "because", "although", "though",
    "however", "meanwhile", "also", "still", "now", "later", "today", "tonight", "tomorrow", "yesterday",
    "soon", "finally", "first", "next", "it", "its", "he", "she", "they", "we", "i", "you", "my", "our", "his",
    "her", "their", "your", "who", "what", "where", "why", "how", "which", "is", "are", "was", "were", "do",
    "does", "did", "have", "has", "had", "can", "could", "will", "would", "should", "may", "might", "must",
    "please", "thanks", "yes", "no", "not", "all", "some", "many", "most", "each", "every", "both", "one",
    "in", "on", "at", "by", "for", "from", "with", "as", "to", "nobody", "everyone", "everybody", "someone",
    "something", "nothing", "anyway",
))  # fmt: skip
_WORD_PUNCT = ".'’&@/_-$%"  # inside the word a dot ends: "U.S", "info@example.org", "$4.99"
_ZWJ = "\u200d"


@dataclass(frozen=True, slots=True)
class Segment:
    """A stretch of the input, ``text == source[start:end]``, with no space at either end.

    The offsets, not just the text, are kept so that later stages (captions, progress, a
    client's highlighting) can point back into the exact string the client sent.
    """

    text: str
    start: int
    end: int


def is_cjk(ch: str) -> bool:
    """Han, kana and Hangul: scripts written without spaces, where a stop needs no space after it."""
    o = ord(ch)
    return (
        0x4E00 <= o <= 0x9FFF
        or 0x3400 <= o <= 0x4DBF
        or 0x20000 <= o <= 0x3134F
        or 0xF900 <= o <= 0xFAFF
        or 0x3040 <= o <= 0x30FF
        or 0xAC00 <= o <= 0xD7AF
        or 0x1100 <= o <= 0x11FF
        or 0x3130 <= o <= 0x318F
    )


def _rstrip(text: str, i: int) -> int:
    while i > 0 and text[i - 1].isspace():
        i -= 1
    return i


def _lstrip(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _word_before(text: str, i: int) -> str:
    """The Latin word that a dot at ``i`` ends, so "(e.g." gives "e.g" and "北京烤鸭" gives ""."""
    j = i
    while j > 0 and (text[j - 1].isalnum() or text[j - 1] in _WORD_PUNCT) and not is_cjk(text[j - 1]):
        j -= 1
    return text[j:i]


def _next_word(text: str, i: int) -> str:
    """The word a new sentence would start with after ``i``, past spaces and opening quotes."""
    i = _lstrip(text, i)
    while i < len(text) and text[i] in _OPENERS:
        i += 1
    j = i
    while j < len(text) and (text[j].isalnum() or text[j] in "'’-") and not is_cjk(text[j]):
        j += 1
    return text[i:j] if j > i else text[i : i + 1]


def _dot_ends_sentence(text: str, dot: int, after: int) -> bool:
    """Whether the single ``.`` at ``dot`` ends a sentence, given that a space, a CJK
    character or the end follows at ``after``: abbreviations, initials and numbering decide."""
    word = _word_before(text, dot)
    nxt = _next_word(text, after)
    if not nxt:
        return True
    if nxt[0].islower():
        return False
    key = word.lower()
    if key in _CONTINUING:
        return False
    if key in _NUMBERING and nxt[0].isdigit():
        return False
    ambiguous = (
        key in _AMBIGUOUS
        or word in _AMBIGUOUS_CASED
        or _DOTTED.fullmatch(word) is not None
        or (len(word) == 1 and word.isalpha() and word != "I")
    )
    if ambiguous:
        # "Acme Inc. The firm", "at 6 p.m. After that", but "J. R. Hartley", "Dr. Who", "p.m. 北京时间"
        return nxt.lower() in _OPENER_WORDS and nxt[0].isupper()
    return True


def _stop_cuts(text: str, cuts: dict[int, int]) -> None:
    """Sentence and clause cuts at runs of stop punctuation (``.!?;`` and ``。！？；…``)."""
    n = len(text)
    for m in _STOP_RUN.finditer(text):
        run = m.group()
        after = m.end()
        while after < n and text[after] in _CLOSERS:
            after += 1
        follower = text[after] if after < n else ""
        spaced = follower == "" or follower.isspace()
        cjk_next = follower != "" and is_cjk(follower)
        prev = text[m.start() - 1] if m.start() > 0 else ""
        level: int | None = None
        if any(c in _CJK_STOPS for c in run):
            level = SENTENCE  # Chinese stops need no space and end the sentence, quotation included
        elif prev and is_cjk(prev) and not (follower.isalnum() and not follower.isupper() and not cjk_next):
            # "录音…Ready?", "你好!我是": after Chinese, ASCII stops act as Chinese ones, unless a
            # lower-case word or a digit follows at once
            level = SENTENCE
        elif not (spaced or cjk_next):
            level = None  # 3.14, v2.0, example.com, "Hey!You"
        elif ";" in run:
            level = SENTENCE
        elif any(c in _LATIN_STRONG for c in run):
            nxt = _next_word(text, after)
            level = CLAUSE if nxt and nxt[0].islower() else SENTENCE  # '"Stop!" shouted the guard.'
        elif len(run) > 1 or "…" in run:  # an ellipsis: "..." or "…"
            nxt = _next_word(text, after)
            level = CLAUSE if nxt and nxt[0].islower() else SENTENCE  # "Wait... what?"
        elif _dot_ends_sentence(text, m.start(), after):
            level = SENTENCE
        if level is not None and after > 0:
            _add(cuts, after, level)


def _add(cuts: dict[int, int], pos: int, level: int) -> None:
    cuts[pos] = min(level, cuts.get(pos, level))


def _cut_levels(text: str) -> dict[int, int]:
    """Every position a segment may end at, with the best level it has (unfiltered by tags)."""
    cuts: dict[int, int] = {}
    _stop_cuts(text, cuts)
    for m in _PARAGRAPH.finditer(text):
        _add(cuts, _rstrip(text, m.start()), SENTENCE)
    for m in _CLAUSE.finditer(text):
        _add(cuts, m.end(), CLAUSE)
    for m in _WHITESPACE_RUN.finditer(text):
        _add(cuts, m.start(), CLAUSE if "\n" in m.group() else WORD)
    for m in _TAG.finditer(text):
        _add(cuts, m.start(), WORD)
        _add(cuts, m.end(), WORD)
    return cuts


class _CutPoints:
    """The places a segment may end, per level, and where a hard cut is allowed."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tag_end: dict[int, int] = {}
        self.blocked = bytearray(len(text) + 1)  # 1 strictly inside a tag: no cut there
        for m in _TAG.finditer(text):
            self.tag_end[m.start()] = m.end()
            self.blocked[m.start() + 1 : m.end()] = b"\x01" * (m.end() - m.start() - 1)
        by_level: list[list[int]] = [[], [], []]
        for pos, level in _cut_levels(text).items():
            # a cut after leading space only, or inside a tag, is no cut
            if 0 < pos <= len(text) and not self.blocked[pos] and not text[pos - 1].isspace():
                by_level[level].append(pos)
        self.by_level = [sorted(positions) for positions in by_level]

    def allowed(self, pos: int) -> bool:
        """A hard cut neither splits a tag nor separates a character from its combining marks."""
        text = self.text
        if self.blocked[pos]:
            return False
        if pos < len(text):
            ch = text[pos]
            if unicodedata.category(ch) in ("Mn", "Mc", "Me") or ch == _ZWJ or 0xFE00 <= ord(ch) <= 0xFE0F:
                return False
            if 0x1F3FB <= ord(ch) <= 0x1F3FF:  # skin-tone modifier
                return False
        return not (pos > 0 and text[pos - 1] == _ZWJ)

    def best(self, lo: int, hi: int) -> int | None:
        """The latest cut of the best level in ``(lo, hi]``, else the latest allowed hard cut."""
        for positions in self.by_level:
            i = bisect.bisect_right(positions, hi) - 1
            if i >= 0 and positions[i] > lo:
                return positions[i]
        pos = hi
        while pos > lo and not self.allowed(pos):
            pos -= 1
        return pos if pos > lo else None

    def smallest_unit(self, start: int) -> int:
        """The end of what cannot be cut at all from ``start``: a whole tag or one character."""
        if start in self.tag_end:
            return self.tag_end[start]
        pos = start + 1
        while pos < len(self.text) and not self.allowed(pos):
            pos += 1
        return pos


def split_sentences(text: str) -> list[Segment]:
    """The sentences of ``text`` (blank lines end one too), for the rules' own tests and the
    boundary-accuracy measurement; ``split_text`` uses the same ends as its preferred cuts."""
    points = _CutPoints(text)
    segments: list[Segment] = []
    pos = _lstrip(text, 0)
    for cut in [*points.by_level[SENTENCE], len(text)]:
        end = _rstrip(text, cut)
        if end > pos:
            segments.append(Segment(text[pos:end], pos, end))
            pos = _lstrip(text, cut)
    return segments


def split_text(
    text: str,
    *,
    count_tokens: Callable[[str], int],
    max_tokens: int = MAX_SEGMENT_TOKENS,
) -> list[Segment]:
    """Segments of ``text``, in order, each within ``max_tokens`` by ``count_tokens``.

    ``count_tokens`` gives the LLM text tokens of a string (for Step1, the SentencePiece pieces
    without BOS; a constant offset such as a BOS only shifts the bound by one). It is a callable
    so that this module stays free of the tokenizer and its model file.

    Every non-space character of ``text`` lands in exactly one segment, and the space between
    segments in none. A segment exceeds the bound only when it is one tag or one character that
    alone does; whitespace-only text gives no segments, and text within the bound one segment,
    the text stripped.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    end = _rstrip(text, len(text))
    pos = _lstrip(text, 0)
    if pos >= end:
        return []
    cutter = _Cutter(text, count_tokens, max_tokens)
    segments: list[Segment] = []
    step = 2 * max_tokens  # characters: about one segment of English, two of Chinese
    while pos < end:
        fit = cutter.longest_fit(pos, end, step)
        cut = end if fit == end else cutter.pick_cut(pos, fit)
        segments.append(Segment(text[pos:cut], pos, cut))
        step = cut - pos
        pos = _lstrip(text, cut)
    return segments


class _Cutter:
    """The token bound applied to one text: how far a segment may reach, and where it ends."""

    def __init__(self, text: str, count_tokens: Callable[[str], int], max_tokens: int) -> None:
        self.text = text
        self.points = _CutPoints(text)
        self.count_tokens = count_tokens
        self.max_tokens = max_tokens

    def fits(self, start: int, end: int) -> bool:
        return self.count_tokens(self.text[start:end]) <= self.max_tokens

    def longest_fit(self, start: int, end: int, step: int) -> int:
        """The furthest ``i`` in ``[start, end]`` with ``text[start:i]`` within the bound.

        Doubling then bisection keeps every probe under twice the segment's length, which is
        what keeps a long input linear. Token counts grow with the prefix almost, not exactly,
        monotonically, so ``pick_cut`` still verifies the segment it picks.
        """
        good = start
        probe = min(start + max(step, 1), end)
        while self.fits(start, probe):
            good = probe
            if probe == end:
                return end
            probe = min(start + 2 * (probe - start), end)
        bad = probe
        while bad - good > 1:
            mid = (good + bad) // 2
            if self.fits(start, mid):
                good = mid
            else:
                bad = mid
        return good

    def pick_cut(self, start: int, fit: int) -> int:
        """Where the segment from ``start`` ends: the best cut up to ``fit``, verified as it is."""
        hi = fit
        while hi > start:
            cut = self.points.best(start, hi)
            if cut is None:
                break
            cut = _rstrip(self.text, cut)
            if self.fits(start, cut):
                return cut
            hi = cut - 1  # a prefix that counted more than a longer one: try the next cut back
        return _rstrip(self.text, self.points.smallest_unit(start))
