"""Numbers, dates, times, currency and units read as words, on request (``step_audio.normalize_text``).

Step1 reads digits and symbols as it learned to, which is not always how a listener expects
``2024-01-05`` or ``$3.50`` to be read. WeTextProcessing's text normalization grammars (the
``wetext`` runtime, the FSTs CosyVoice uses, shipped in its wheel) rewrite them as words in
Chinese and English, picking the language from the text. It is off by default, so the model sees
exactly the reference's input unless a request asks. Inline tags (``[Laughter]``) are kept as
they are: only the text between them is rewritten.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Any

from engine.segments import TAG_PATTERN

_TAG = re.compile(f"({TAG_PATTERN})")  # captured: split keeps the tags, at the odd indices
_lock = threading.Lock()


@lru_cache(maxsize=1)
def _normalizer() -> Any:
    from wetext import Normalizer  # imported on first use: a server that never normalizes never loads it

    return Normalizer(operator="tn")


def normalize_text(text: str) -> str:
    """``text`` with numbers, dates, times, currency and units written out, tags untouched."""
    parts = _TAG.split(text)
    with _lock:  # one grammar object shared by the worker threads
        normalizer = _normalizer()
        out = [part if k % 2 or not part.strip() else _keep_spacing(part, normalizer) for k, part in enumerate(parts)]
    return "".join(out)


def _keep_spacing(part: str, normalizer: Any) -> str:
    """The normalized part with the spaces around it kept (the grammar trims them)."""
    core = part.strip()
    head, tail = part[: len(part) - len(part.lstrip())], part[len(part.rstrip()) :]
    return head + str(normalizer.normalize(core)) + tail
