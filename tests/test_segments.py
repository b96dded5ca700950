"""Long text cut into segments (engine/segments.py): sentence rules on a gold corpus, the cut
preferences, the invariants as properties, and the bound with the real and the made tokenizer."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.bench_segments import MAX_INPUT_CHARS, boundary_scores, load_gold, long_text, ours
from bundles.text_tokenizer_bundle import write_text_tokenizer
from engine.segments import (
    AUDIO_IDS_PER_SECOND,
    MAX_SEGMENT_TOKENS,
    SLOWEST_TOKENS_PER_SECOND,
    Segment,
    is_cjk,
    split_sentences,
    split_text,
)
from llm.prompts import PARALINGUISTIC_TAGS
from llm.text_tokenizer import StepTextTokenizer, load_text_tokenizer

DATA = Path(__file__).parent / "data"
TAG = re.compile(r"\[[^\[\]\n]{1,38}\]")
# deterministic (no example database, no clock): the same examples on every run and machine
PROPERTIES = settings(database=None, deadline=None, derandomize=True, max_examples=300)


def words(text: str) -> int:
    """A tokenizer stand-in: one token per Latin word, number or CJK character, none for the rest."""
    return sum(len(m.group()) if is_cjk(m.group()[0]) else 1 for m in re.finditer(r"[^\W\d_]+|\d+", text))


def mixed_text(n: int = MAX_INPUT_CHARS) -> str:
    text = " ".join(doc.text for doc in load_gold())
    return (text * (n // len(text) + 1))[:n]


def check_segments(text: str, segments: list[Segment]) -> None:
    """The invariants every result keeps, whatever the bound and the counter."""
    pos = 0
    for seg in segments:
        assert seg.start < seg.end
        assert text[seg.start : seg.end] == seg.text == seg.text.strip()
        assert text[pos : seg.start].strip() == "", "a non-space character fell between segments"
        pos = seg.end
    assert text[pos:].strip() == ""
    if not text.strip():
        assert segments == []


def check_bound(segments: list[Segment], count: Callable[[str], int], max_tokens: int) -> None:
    """No segment over the bound, except one that is a single tag or character cluster."""
    for seg in segments:
        if count(seg.text) > max_tokens:
            assert TAG.fullmatch(seg.text) or one_cluster(seg.text), seg


def check_tags_whole(text: str, segments: list[Segment]) -> None:
    for m in TAG.finditer(text):
        assert any(s.start <= m.start() and m.end() <= s.end for s in segments), m.group()


def one_cluster(text: str) -> bool:
    """One character with only combining marks, variation selectors or joined characters after it."""
    return all(
        unicodedata.category(c) in ("Mn", "Mc", "Me")
        or c == "\u200d"
        or text[i - 1] == "\u200d"
        or 0xFE00 <= ord(c) <= 0xFE0F
        or 0x1F3FB <= ord(c) <= 0x1F3FF
        for i, c in enumerate(text)
        if i
    )


@pytest.fixture(scope="module")
def made_tok(tmp_path_factory: pytest.TempPathFactory) -> StepTextTokenizer:
    d = tmp_path_factory.mktemp("editx")
    write_text_tokenizer(d)
    return load_text_tokenizer(d)


@pytest.fixture(scope="module")
def real_tok(step1_tokenizer_dir: Path) -> StepTextTokenizer:
    return load_text_tokenizer(step1_tokenizer_dir)


def pieces_counter(tok: StepTextTokenizer) -> Callable[[str], int]:
    return lambda s: len(tok.sp.encode(s))


# ---- sentences: the gold corpus ----------------------------------------------------------------


def test_gold_corpus_boundaries():
    docs = load_gold()
    scores = boundary_scores(docs, ours)
    assert scores["boundaries"] >= 180
    assert scores["precision"] >= 0.97 and scores["recall"] >= 0.97, scores
    for section in {d.section for d in docs}:
        scores = boundary_scores([d for d in docs if d.section == section], ours)
        assert scores["precision"] >= 0.9 and scores["recall"] >= 0.9, (section, scores)


def test_gold_corpus_sections():
    sections = {d.section for d in load_gold()}
    assert sections == {"en", "zh", "mixed", "en/held-out", "zh/held-out", "mixed/held-out"}


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("Dr. Smith is here. He is early.", ["Dr. Smith is here.", "He is early."]),
        ("Bring a pen, e.g. a blue one. Thanks.", ["Bring a pen, e.g. a blue one.", "Thanks."]),
        ("The U.S. team won. The U.K. lost.", ["The U.S. team won.", "The U.K. lost."]),
        ("He moved to the U.S. The rest is history.", ["He moved to the U.S.", "The rest is history."]),
        ("Pi is 3.14 or so. Use v2.0 now.", ["Pi is 3.14 or so.", "Use v2.0 now."]),
        ("It was v2.0. Then came v3.", ["It was v2.0.", "Then came v3."]),
        ("Wait... what? No... Yes.", ["Wait... what?", "No...", "Yes."]),
        ("Well… I see. He paused… and left.", ["Well…", "I see.", "He paused… and left."]),
        ('She said, "Go home." Then she left.', ['She said, "Go home."', "Then she left."]),
        ('"Stop!" shouted the guard. We froze.', ['"Stop!" shouted the guard.', "We froze."]),
        ("It closed. (It reopened in May.) Good.", ["It closed.", "(It reopened in May.)", "Good."]),
        ("Fine; thanks.", ["Fine;", "thanks."]),
        ("Really?! Yes!", ["Really?!", "Yes!"]),
        ("See Fig. 3 and No. 7. Done.", ["See Fig. 3 and No. 7.", "Done."]),
        ("J. R. Hartley wrote it. It sold.", ["J. R. Hartley wrote it.", "It sold."]),
        ("First.\n\nSecond", ["First.", "Second"]),
        ("one line\nanother line", ["one line\nanother line"]),
        ("今天天气很好。我们去公园吧！好不好？", ["今天天气很好。", "我们去公园吧！", "好不好？"]),
        ("他说：“我们走吧。”然后离开了。", ["他说：“我们走吧。”", "然后离开了。"]),
        ("复杂；需要时间。", ["复杂；", "需要时间。"]),
        ("我想了想……还是算了。", ["我想了想……", "还是算了。"]),
        ("圆周率是3.14。版本v2.0发布了。", ["圆周率是3.14。", "版本v2.0发布了。"]),
        ("你好!我叫李明.", ["你好!", "我叫李明."]),
        ("我用Python 3.11。It works.", ["我用Python 3.11。", "It works."]),
        ("会议由Dr. Smith主持。很好。", ["会议由Dr. Smith主持。", "很好。"]),
        ("I love 北京烤鸭. It is good.", ["I love 北京烤鸭.", "It is good."]),
        ("Great. [Laughter] Anyway.", ["Great.", "[Laughter] Anyway."]),
        ("Ha[Wow. Really.]ha. Next.", ["Ha[Wow. Really.]ha.", "Next."]),
        ("  \n ", []),
        ("  Hello  ", ["Hello"]),
    ],
)
def test_sentences(text, sentences):
    got = split_sentences(text)
    assert [s.text for s in got] == sentences
    check_segments(text, got)


# ---- segments: where the cuts go ---------------------------------------------------------------


def texts(segments: list[Segment]) -> list[str]:
    return [s.text for s in segments]


def test_short_text_is_one_segment_equal_to_the_stripped_input():
    text = "  Dr. Smith said hello. Then he left!\n"
    assert split_text(text, count_tokens=words, max_tokens=10) == [Segment(text.strip(), 2, len(text) - 1)]


@pytest.mark.parametrize("text", ["", " ", "\n\t \u3000 \n"])
def test_whitespace_gives_no_segments(text):
    assert split_text(text, count_tokens=words, max_tokens=10) == []


def test_sentences_are_packed_up_to_the_bound():
    text = "One two three. Four five six. Seven eight nine. Ten."
    assert texts(split_text(text, count_tokens=words, max_tokens=6)) == [
        "One two three. Four five six.",
        "Seven eight nine. Ten.",
    ]
    assert texts(split_text(text, count_tokens=words, max_tokens=9)) == [
        "One two three. Four five six. Seven eight nine.",
        "Ten.",
    ]


def test_a_sentence_end_beats_a_later_comma():
    text = "Hi there. One two three, four five six seven eight nine, ten."
    assert texts(split_text(text, count_tokens=words, max_tokens=8))[0] == "Hi there."


def test_a_long_sentence_is_cut_at_the_last_comma_before_the_bound():
    text = "one two, three four, five six seven eight nine ten"
    assert texts(split_text(text, count_tokens=words, max_tokens=6)) == [
        "one two, three four,",
        "five six seven eight nine ten",
    ]


def test_chinese_clause_punctuation_is_a_cut():
    text = "我们今天、明天，后天都去公园散步" * 3
    segments = split_text(text, count_tokens=words, max_tokens=12)
    check_segments(text, segments)
    assert all(s.text[-1] in "，、" for s in segments[:-1])


def test_without_punctuation_the_cut_is_at_the_last_space():
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    assert texts(split_text(text, count_tokens=words, max_tokens=4)) == [
        "alpha beta gamma delta",
        "epsilon zeta eta theta",
        "iota kappa",
    ]


def test_a_run_without_space_is_cut_hard_at_the_bound():
    text = "x" * MAX_INPUT_CHARS
    segments = split_text(text, count_tokens=len, max_tokens=100)
    check_segments(text, segments)
    assert [len(s.text) for s in segments] == [100] * 40 + [96]


def test_a_chinese_run_without_punctuation_is_cut_between_characters():
    text = "这是一个没有任何标点符号的句子" * 20
    segments = split_text(text, count_tokens=words, max_tokens=50)
    check_segments(text, segments)
    assert [len(s.text) for s in segments] == [50] * 6


def test_a_word_longer_than_the_bound_is_cut_hard_then_spaces_win_again():
    text = "short " + "y" * 25 + " tail words here"
    assert texts(split_text(text, count_tokens=len, max_tokens=10)) == [
        "short",
        "y" * 10,
        "y" * 10,
        "yyyyy tail",
        "words here",
    ]


@pytest.mark.parametrize("tag", PARALINGUISTIC_TAGS)
def test_inline_tags_are_never_cut(tag):
    for filler in range(1, 30):
        text = "a" * filler + tag + "b" * 30
        segments = split_text(text, count_tokens=len, max_tokens=20)
        check_segments(text, segments)
        check_tags_whole(text, segments)


def test_a_tag_longer_than_the_bound_is_kept_whole():
    text = "x [Dissatisfaction-hnn] y"
    assert texts(split_text(text, count_tokens=len, max_tokens=5)) == ["x", "[Dissatisfaction-hnn]", "y"]


def test_a_bracket_longer_than_a_tag_may_be_cut():
    text = "[" + "word " * 20 + "]"
    segments = split_text(text, count_tokens=words, max_tokens=5)
    assert len(segments) == 4
    check_segments(text, segments)


def test_combining_marks_stay_with_their_letter():
    text = "e\u0301" * 30  # é as e + combining acute
    segments = split_text(text, count_tokens=len, max_tokens=5)
    check_segments(text, segments)
    assert all(s.text[0] == "e" for s in segments)


def test_each_segment_is_counted_as_it_is():
    """Token counts need not grow with the prefix: the chosen cut is counted again, and moved back
    when it counts over the bound although a longer prefix fitted."""
    text = "aaaa. bbbbbbbb"
    assert quirky("aaaa. ") == 6 < quirky("aaaa.") == 10
    assert texts(split_text(text, count_tokens=quirky, max_tokens=6)) == ["aaaa", ".", "bbbbbb", "bb"]


def test_max_tokens_must_be_positive():
    with pytest.raises(ValueError, match="max_tokens"):
        split_text("Hello.", count_tokens=words, max_tokens=0)


# ---- 4096 characters, with the made and the real tokenizer --------------------------------------


LONG_TEXTS = {
    "english": lambda: long_text("long-text-en.txt"),
    "chinese": lambda: long_text("long-text-zh.txt"),
    "mixed": mixed_text,
    "no-space": lambda: "x" * MAX_INPUT_CHARS,
    "no-space-chinese": lambda: ("这是一个没有任何标点符号的句子" * 300)[:MAX_INPUT_CHARS],
}


@pytest.mark.parametrize("name", LONG_TEXTS)
@pytest.mark.parametrize("which", ["made", "real"])
def test_4096_characters(name, which, request):
    tok = request.getfixturevalue(f"{which}_tok")
    count = pieces_counter(tok)
    text = LONG_TEXTS[name]()
    assert len(text) == MAX_INPUT_CHARS
    segments = split_text(text, count_tokens=count)
    check_segments(text, segments)
    check_tags_whole(text, segments)
    assert all(count(s.text) <= MAX_SEGMENT_TOKENS for s in segments)
    assert len(segments) > 1


def test_english_prose_is_cut_only_between_sentences(real_tok):
    text = long_text("long-text-en.txt")
    segments = split_text(text, count_tokens=pieces_counter(real_tok))
    ends = {s.end for s in split_sentences(text)}
    assert all(s.end in ends for s in segments)
    # every cut is at a sentence end, and a segment is filled to most of the bound
    sizes = [len(real_tok.sp.encode(s.text)) for s in segments[:-1]]
    assert sum(sizes) / len(sizes) >= 0.75 * MAX_SEGMENT_TOKENS


def test_bound_derivation_matches_the_real_tokenizer(real_tok):
    """The rates MAX_SEGMENT_TOKENS was derived from (docs/long-text.md), measured again."""
    en = (DATA / "long-text-en.txt").read_text(encoding="utf-8")
    zh = (DATA / "long-text-zh.txt").read_text(encoding="utf-8")
    en_per_word = len(real_tok.sp.encode(en)) / len(re.findall(r"[A-Za-z']+", en))
    zh_per_char = len(real_tok.sp.encode(zh)) / sum(map(is_cjk, zh))
    assert en_per_word == pytest.approx(1.35, abs=0.01) and zh_per_char == pytest.approx(0.78, abs=0.01)
    slowest = min(en_per_word * 2.5, zh_per_char * 4.0)  # tokens/s at 2.5 words/s, 4 characters/s
    assert slowest == pytest.approx(SLOWEST_TOKENS_PER_SECOND, abs=0.05)
    assert MAX_SEGMENT_TOKENS / SLOWEST_TOKENS_PER_SECOND <= 30
    assert MAX_SEGMENT_TOKENS / SLOWEST_TOKENS_PER_SECOND * AUDIO_IDS_PER_SECOND + 1500 < 8192 / 2


# ---- properties ---------------------------------------------------------------------------------


FRAGMENTS = st.sampled_from(
    [
        "Dr.", "e.g.", "U.S.", "3.14", "v2.0", "...", "…", "……", "!", "?", "?!", ";", ".", ",", ":", "，", "。",
        "！", "？", "；", "、", "“", "”", '"', "'", "(", ")", "（", "）", "[", "]", "-", "—", "\n", "\n\n", " ",
        "  ", "\t", "\u3000", "word", "Word", "The", "a", "I", "x" * 30, "你好", "中文句子", "的", "e\u0301",
        "👍🏽", "👨\u200d👩", "\u200d",
        *PARALINGUISTIC_TAGS, "[Sichuanese]", "[a b c]",
    ]
)  # fmt: skip
TEXTS = st.lists(st.one_of(FRAGMENTS, st.text(max_size=5)), max_size=60).map("".join)
COUNTERS = st.sampled_from(["words", "len", "made", "quirky"])


def quirky(text: str) -> int:
    """Not monotonic in the prefix (as a real tokenizer need not be): a final stop costs 5 more."""
    return len(text) + 5 * text.endswith((".", "。", ",", "，", "!", "?"))


@pytest.fixture(scope="module")
def counters(made_tok: StepTextTokenizer) -> dict[str, Callable[[str], int]]:
    return {"words": words, "len": len, "made": pieces_counter(made_tok), "quirky": quirky}


@PROPERTIES
@given(text=TEXTS, which=COUNTERS, max_tokens=st.integers(1, 40))
def test_segments_cover_the_text_exactly_once_within_the_bound(counters, text, which, max_tokens):
    count = counters[which]
    segments = split_text(text, count_tokens=count, max_tokens=max_tokens)
    check_segments(text, segments)
    check_bound(segments, count, max_tokens)
    check_tags_whole(text, segments)
    if text.strip() and count(text.strip()) <= max_tokens:
        assert texts(segments) == [text.strip()]


@PROPERTIES
@given(text=TEXTS)
def test_sentences_cover_the_text_exactly_once(text):
    sentences = split_sentences(text)
    check_segments(text, sentences)
    check_tags_whole(text, sentences)


@PROPERTIES
@given(text=TEXTS, max_tokens=st.integers(1, 40))
def test_sentence_ends_are_kept_where_sentences_fit(text, max_tokens):
    """A sentence that fits the bound by itself is never cut inside."""
    segments = split_text(text, count_tokens=words, max_tokens=max_tokens)
    cuts = {s.end for s in segments}
    for sentence in split_sentences(text):
        if words(sentence.text) <= max_tokens:
            assert not any(sentence.start < c < sentence.end for c in cuts), sentence
