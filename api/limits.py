"""Every bound on the size of a request, in one place: the body, each text field, the edit list.

Free text (spoken, or written into an LLM prompt) is held to ``--max-input-chars`` per field,
checked here once the body is parsed (413 naming the field). Identifiers and URLs have fixed
bounds that the schema states (``max_length``, so the OpenAPI document shows them). Base64 audio
is bounded by its decoded bytes (``--max-upload-bytes``, ``api.inputs``). The body limit is
derived from all of these, so the largest valid request fits and anything larger is refused
before it is read (``api.admission``): no field can be large without the body being large.
"""

from __future__ import annotations

from api.schemas import MAX_NAME_CHARS, MAX_URL_CHARS, SpeechRequest  # the fixed bounds the schema states
from errors import TooLargeError
from settings import Settings

JSON_BYTES_PER_CHAR = 12  # the most one character can take in JSON: an escaped surrogate pair, \uXXXX\uXXXX
BASE64_LINE_CHARS = 76  # MIME's line length; a wrapped clip pays one escaped CRLF ("\r\n": 4 bytes) per line
STRUCTURE_BYTES = 64 * 1024  # field names, punctuation, numbers, multipart part headers


def free_text_fields(settings: Settings) -> list[str]:
    """The fields held to ``--max-input-chars``, with one text per allowed edit step."""
    edits = [f"step_audio.edits[{i}].text" for i in range(settings.max_chain_steps)]
    return ["input", "instructions", "step_audio.prompt_text", "step_audio.audio_text", *edits]


def derived_body_limit(settings: Settings) -> int:
    """The largest body a valid request can need: one base64 clip (a request uses one audio input;
    clone takes ``prompt_audio``, an edit ``input_audio``), wrapped at 76 characters, and every
    text field at its limit in the costliest JSON encoding. A multipart body holds the clip raw,
    which is smaller."""
    b64 = 4 * -(-settings.max_upload_bytes // 3)
    wrapped = b64 + 4 * -(-b64 // BASE64_LINE_CHARS)
    free_text = settings.max_input_chars * len(free_text_fields(settings))
    # model, voice, step_audio.edit_info and each edit's edit_info; the two audio URLs
    identifiers = MAX_NAME_CHARS * (3 + settings.max_chain_steps) + 2 * MAX_URL_CHARS
    return wrapped + JSON_BYTES_PER_CHAR * (free_text + identifiers) + STRUCTURE_BYTES


def body_limit(settings: Settings) -> int:
    """``--max-body-bytes`` when the operator set it, else the derived limit."""
    return settings.max_body_bytes if settings.max_body_bytes is not None else derived_body_limit(settings)


def check_text(param: str, text: str | None, limit: int) -> None:
    """413 naming ``param`` when ``text`` has more than ``limit`` characters."""
    if text is not None and len(text) > limit:
        raise TooLargeError(f"{param} is {len(text)} characters; the limit is {limit}", param=param)


def check_request_text(settings: Settings, body: SpeechRequest) -> None:
    """Every free-text field of a speech request, and the number of edit steps, against the settings.

    Runs first, before anything reads a text (instructions mapping, inline tags, the catalogue),
    so the cost of every later check is bounded by these limits.
    """
    opts = body.step_audio
    edits = opts.edits or []
    if len(edits) > settings.max_chain_steps:
        raise TooLargeError(
            f"step_audio.edits has {len(edits)} steps; the limit is {settings.max_chain_steps}",
            param="step_audio.edits",
        )
    texts = [body.input, body.instructions, opts.prompt_text, opts.audio_text, *(e.text for e in edits)]
    for param, text in zip(free_text_fields(settings), texts, strict=False):
        check_text(param, text, settings.max_input_chars)
