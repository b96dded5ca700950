"""Text that arrives in pieces: the segments handed out as sentences complete (``engine.text_stream``)."""

from __future__ import annotations

import itertools
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.segments import split_text
from engine.text_stream import SegmentFeed, TextCutter

TEXT = (
    "Dr. Smith arrived at 3.14 p.m. on the first day. He said hello to everyone in the room. "
    "Then he left quickly and quietly, without a word to anyone at all in the whole building, "
    "and nobody saw him again until the morning after. 你好。我们走吧！ The end"
)


def words(text: str) -> int:
    return len(text.split())


def cut(pieces: list[str], max_tokens: int = 12) -> tuple[list, list[int]]:
    """Every segment handed out, and after how many pieces each one came."""
    cutter = TextCutter(count_tokens=words, max_tokens=max_tokens)
    out, when = [], []
    for i, piece in enumerate(pieces):
        for segment in cutter.feed(piece):
            out.append(segment)
            when.append(i)
    for segment in cutter.finish():
        out.append(segment)
        when.append(len(pieces))
    return out, when


def test_a_sentence_is_handed_out_once_the_next_one_begins() -> None:
    pieces = ["Hello there.", " How", " are you?", " Fine"]
    segments, when = cut(pieces, max_tokens=3)
    assert [s.text for s in segments] == ["Hello there.", "How are you?", "Fine"]
    assert when == [1, 3, 4]  # "Hello there." waits for "How": a final "." may still be "Dr."


def test_an_abbreviation_or_a_decimal_never_ends_a_segment_early() -> None:
    segments, _ = cut(["Dr.", " Smith", " paid", " 3.", "14", " dollars.", " Then"], max_tokens=50)
    assert segments[0].text == "Dr. Smith paid 3.14 dollars."


def test_text_without_sentence_ends_is_cut_at_the_bound() -> None:
    pieces = [f"word{k} " for k in range(30)]
    segments, when = cut(pieces, max_tokens=10)
    assert all(words(s.text) <= 10 for s in segments)
    assert when[0] < len(pieces)  # the first segment left before the text ended


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(TEXT) - 1), max_size=40))
def test_any_split_of_the_text_gives_every_character_once_in_order_within_the_bound(cuts: list[int]) -> None:
    bounds = [0, *sorted(set(cuts)), len(TEXT)]
    pieces = [TEXT[a:b] for a, b in itertools.pairwise(bounds)]
    segments, _ = cut(pieces)
    assert "".join(s.text for s in segments).replace(" ", "") == TEXT.replace(" ", "")
    assert all(TEXT[s.start : s.end] == s.text for s in segments)
    assert all(a.end <= b.start for a, b in itertools.pairwise(segments))
    assert all(words(s.text) <= 12 for s in segments)


def test_the_feed_hands_segments_to_another_thread_until_closed() -> None:
    feed = SegmentFeed()
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(s.text for s in feed))
    reader.start()
    for segment in split_text(TEXT, count_tokens=words, max_tokens=12):
        feed.put(segment)
    feed.close()
    reader.join(10)
    assert not reader.is_alive() and got == [s.text for s in split_text(TEXT, count_tokens=words, max_tokens=12)]
