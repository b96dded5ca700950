"""Sentence-boundary accuracy and cost of engine/segments.py, and of pysbd beside it when installed.

Run: ``python -m bench.bench_segments [--tokenizer DIR] [--repeats 20]``. Not a test.

* **accuracy**: boundary precision, recall and F1 of ``split_sentences`` on the gold corpus
  ``tests/data/sentence-boundaries.txt``, per section. When ``pysbd`` can be imported (it is not
  a dependency: ``pip install pysbd==0.3.4`` to compare), the same for pysbd's English and
  Chinese segmenters, for English-or-Chinese by section, and for pysbd's English ends joined with
  our ends at Chinese punctuation and semicolons. These are the numbers in docs/long-text.md.
* **cost**: ``split_text`` on 4096 characters (English and Chinese prose, the mixed corpus, a run
  without any space) with ``--tokenizer`` (a directory holding a SentencePiece ``tokenizer.model``,
  e.g. the public Step1 one; default: the project-made stand-in), median of ``--repeats``, with
  the number of token counts it made; and pysbd's English segmenter on the English text.

Prints JSON and writes ``bench/out/segments.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bundles.text_tokenizer_bundle import write_text_tokenizer
from engine.segments import is_cjk, split_sentences, split_text
from llm.text_tokenizer import load_text_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "tests" / "data"
GOLD = DATA / "sentence-boundaries.txt"
OUT_DIR = REPO_ROOT / "bench" / "out"
MAX_INPUT_CHARS = 4096


@dataclass(frozen=True)
class GoldDoc:
    section: str  # "en", "zh", "mixed", each also "/held-out"
    text: str
    ends: frozenset[int]  # offsets just past each sentence but the last


def load_gold(path: Path = GOLD) -> list[GoldDoc]:
    """The gold file's documents: one a line, "|" where a sentence ends, "[name]" starts a section."""
    docs = []
    section = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if re.fullmatch(r"\[[a-z/-]+\]", line):
            section = line[1:-1]
            continue
        text, ends = "", set()
        for i, part in enumerate(line.replace("\\n", "\n").split("|")):
            if i:
                ends.add(len(text.rstrip()))
            text += part
        docs.append(GoldDoc(section, text, frozenset(ends)))
    return docs


def boundary_scores(docs: list[GoldDoc], ends_of: Callable[[GoldDoc], set[int]]) -> dict[str, float]:
    """Precision, recall and F1 of the sentence ends ``ends_of`` finds, the text's own end left out."""
    tp = fp = fn = 0
    for doc in docs:
        found = ends_of(doc) - {len(doc.text.rstrip())}
        tp, fp, fn = tp + len(found & doc.ends), fp + len(found - doc.ends), fn + len(doc.ends - found)
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-9)
    return {"precision": precision, "recall": recall, "f1": f1, "boundaries": tp + fn}


def ours(doc: GoldDoc) -> set[int]:
    return {s.end for s in split_sentences(doc.text)}


def long_text(name: str, n: int = MAX_INPUT_CHARS) -> str:
    """Exactly ``n`` characters of a prose file, repeated paragraph by paragraph."""
    paragraphs = [p for p in (DATA / name).read_text(encoding="utf-8").splitlines() if p]
    text = ""
    while len(text) < n:
        text += paragraphs[len(text) % len(paragraphs)] + "\n"
    return text[:n]


def pysbd_splitters() -> dict[str, Callable[[GoldDoc], set[int]]]:
    """pysbd's segmenters as sentence-end finders; none when pysbd is not installed."""
    try:
        import pysbd
    except ImportError:
        return {}
    segmenters = {lang: pysbd.Segmenter(language=lang, clean=False) for lang in ("en", "zh")}

    def ends(text: str, lang: str) -> set[int]:
        found, pos = set(), 0
        for piece in segmenters[lang].segment(text):
            sentence = piece.strip()
            i = text.find(sentence, pos) if sentence else -1
            if i >= 0:
                pos = i + len(sentence)
                found.add(pos)
        return found

    def joined(doc: GoldDoc) -> set[int]:
        # pysbd for English, our ends where Chinese punctuation, a semicolon or a CJK neighbour decides
        text = doc.text
        extra = {
            e for e in ours(doc) if text[e - 1] in "；;。！？…”’」』）" or any(map(is_cjk, text[max(0, e - 3) : e + 2]))
        }
        return ends(text, "en") | extra

    return {
        "pysbd-en": lambda d: ends(d.text, "en"),
        "pysbd-zh": lambda d: ends(d.text, "zh"),
        "pysbd-by-section": lambda d: ends(d.text, "zh" if d.section.startswith("zh") else "en"),
        "pysbd-en+ours-cjk": joined,
    }


def accuracy() -> dict[str, dict[str, dict[str, float]]]:
    docs = load_gold()
    sections = sorted({d.section for d in docs}, key=lambda s: ("held-out" in s, s))
    results = {}
    for name, ends_of in {"ours": ours, **pysbd_splitters()}.items():
        results[name] = {s: boundary_scores([d for d in docs if d.section == s], ends_of) for s in sections}
        results[name]["all"] = boundary_scores(docs, ends_of)
    return results


def timed(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def cost(tokenizer_dir: Path, label: str, repeats: int) -> dict[str, Any]:
    tok = load_text_tokenizer(tokenizer_dir)
    calls = 0

    def count(text: str) -> int:
        nonlocal calls
        calls += 1
        return len(tok.sp.encode(text))

    mixed = " ".join(d.text for d in load_gold())
    texts = {
        "english": long_text("long-text-en.txt"),
        "chinese": long_text("long-text-zh.txt"),
        "mixed": (mixed * (MAX_INPUT_CHARS // len(mixed) + 1))[:MAX_INPUT_CHARS],
        "no-space": "x" * MAX_INPUT_CHARS,
    }
    results: dict[str, Any] = {"tokenizer": label}
    for name, text in texts.items():
        calls = 0
        segments = split_text(text, count_tokens=count)
        results[name] = {
            "chars": len(text),
            "segments": len(segments),
            "token_counts": calls,
            "tokens_per_segment": [len(tok.sp.encode(s.text)) for s in segments],
            "split_text_ms": timed(partial(split_text, text, count_tokens=count), repeats),
            "split_sentences_ms": timed(partial(split_sentences, text), repeats),
        }
    try:
        import pysbd

        segmenter = pysbd.Segmenter(language="en", clean=False)
        results["english"]["pysbd_en_ms"] = timed(lambda: segmenter.segment(texts["english"]), max(repeats // 4, 1))
    except ImportError:
        pass
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tokenizer", type=Path, default=None, help="directory with tokenizer.model")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir, label = args.tokenizer, str(args.tokenizer)
        if tokenizer_dir is None:
            tokenizer_dir, label = Path(tmp), "project-made stand-in (bundles/text_tokenizer_bundle.py)"
            write_text_tokenizer(tokenizer_dir)
        results = {"accuracy": accuracy(), "cost": cost(tokenizer_dir, label, args.repeats)}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, ensure_ascii=False)
    (OUT_DIR / "segments.json").write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
