"""Request audio (base64, URL, upload) to the engine's ``AudioInput``, with every limit checked.

Bytes are bounded before they are decoded (a base64 string's length gives its decoded size),
decoding (base64 and audio) runs off the event loop, and the decoded duration is bounded too.
"""

from __future__ import annotations

import base64
import binascii
import re

from starlette.concurrency import run_in_threadpool

from api.url_fetch import fetch_audio_url
from audio import decode_audio
from engine.types import AudioInput
from errors import InvalidInputError, TooLargeError
from settings import Settings

_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


def decode_base64_audio(value: str, *, max_bytes: int, param: str) -> bytes:
    """Strict base64 (a ``data:...;base64,`` prefix allowed) with its decoded size bounded."""
    text = _DATA_URL.sub("", value.strip(), count=1)
    text = "".join(text.split())  # line-wrapped base64 is common
    if len(text) // 4 * 3 > max_bytes + 2:
        raise TooLargeError(f"{param}: the audio is larger than {max_bytes} bytes", param=param)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInputError(f"{param} is not valid base64 ({exc})", param=param) from exc
    if len(data) > max_bytes:
        raise TooLargeError(f"{param}: the audio is larger than {max_bytes} bytes", param=param)
    return data


async def decode_audio_bytes(data: bytes, *, settings: Settings, param: str) -> AudioInput:
    """Decode in a thread; the duration limit stops the decoder early (a compressed file can hold hours)."""
    try:
        samples, sample_rate = await run_in_threadpool(decode_audio, data, max_seconds=settings.max_audio_seconds)
    except InvalidInputError as exc:  # keeps the class: too long stays 413, unreadable 400
        raise exc.__class__(f"{param}: {exc}", param=param) from exc
    return AudioInput(samples=samples, sample_rate=sample_rate)


async def load_audio(
    settings: Settings,
    *,
    base64_value: str | None,
    url: str | None,
    upload: bytes | None,
    param: str,
) -> AudioInput | None:
    """The one audio a request gives under ``param`` (at most one source), or None."""
    given = [name for name, v in (("base64", base64_value), ("url", url), ("file", upload)) if v is not None]
    if len(given) > 1:
        raise InvalidInputError(f"give {param} once (got it as {' and '.join(given)})", param=param)
    if upload is not None:
        return await decode_audio_bytes(upload, settings=settings, param=f"{param}_file")
    if base64_value is not None:
        name = f"step_audio.{param}_base64"
        # tens of MB of text to strip and decode: in a thread, as the JSON parse was (api.json_body)
        data = await run_in_threadpool(
            decode_base64_audio, base64_value, max_bytes=settings.max_upload_bytes, param=name
        )
        return await decode_audio_bytes(data, settings=settings, param=name)
    if url is not None:
        name = f"step_audio.{param}_url"
        if not settings.allow_audio_urls:
            raise InvalidInputError(
                f"{name}: URL inputs are disabled on this server (start it with --allow-audio-urls)",
                param=name,
            )
        data = await fetch_audio_url(
            url, max_bytes=settings.max_upload_bytes, timeout_s=settings.url_timeout_s, param=name
        )
        return await decode_audio_bytes(data, settings=settings, param=name)
    return None
