"""The only server files the web UI reads: what was uploaded through its page.

An event's file inputs arrive as server paths (Gradio uploads a file first, then names it), and
Gradio reads whatever path a mounted app is handed. So a path is accepted only if it resolves to
a regular file inside Gradio's upload directory, within the upload limit, decided from the path
and ``stat`` before anything opens it (a device, a FIFO or ``/proc`` file is never opened), and
checked again on the opened file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from errors import InvalidInputError, StepAudioError, TooLargeError


class UploadedFiles:
    """The only server files the web UI reads: regular files in Gradio's upload directory, within the limit.

    Gradio stores every upload (and every output it hands the page, which the page may send back as
    an input) there. ``check`` decides from the path and ``stat`` alone, so a device, a FIFO or a
    path outside is refused before anything opens it; ``read`` checks again on the opened file
    (no symlink followed, non-blocking open) and never reads past the limit.
    """

    def __init__(self, root: str | Path, max_bytes: int) -> None:
        self.root = os.path.realpath(root)
        self.max_bytes = max_bytes

    def check(self, path: object, param: str) -> str:
        """The resolved path of an acceptable upload; InvalidInputError or TooLargeError otherwise."""
        refused = _refused(param)
        if not isinstance(path, str) or not path or "\x00" in path or "://" in path or not os.path.isabs(path):
            raise refused
        real = os.path.realpath(path)
        if os.path.dirname(real) == real or os.path.commonpath([real, self.root]) != self.root or real == self.root:
            raise refused
        try:
            info = os.stat(real)
        except OSError:
            raise refused from None
        self._check_stat(info, param, refused)
        return real

    def read(self, path: str, param: str) -> bytes:
        """The file's bytes, after ``check`` and the same checks on the opened file."""
        real = self.check(path, param)
        refused = _refused(param)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            raise refused from None
        with os.fdopen(fd, "rb") as file:
            self._check_stat(os.fstat(fd), param, refused)
            data = file.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise _too_large(param, self.max_bytes)
        return data

    def _check_stat(self, info: os.stat_result, param: str, refused: StepAudioError) -> None:
        if not stat.S_ISREG(info.st_mode):
            raise refused
        if info.st_size > self.max_bytes:
            raise _too_large(param, self.max_bytes)


def _refused(param: str) -> InvalidInputError:
    return InvalidInputError(f"{param}: the web UI reads only files uploaded through its page", param=param)


def _too_large(param: str, max_bytes: int) -> TooLargeError:
    return TooLargeError(f"{param}: the upload is larger than {max_bytes} bytes", param=param)


def file_references(value: object) -> Iterator[dict[str, Any]]:
    """Every object in a JSON value that names a file (Gradio's ``FileData``: a ``path``, a ``url``, its meta)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            meta = item.get("meta")
            if "path" in item or "url" in item or (isinstance(meta, dict) and meta.get("_type") == "gradio.FileData"):
                yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
