"""What a ``queue/join`` (how the page runs an event) may carry: only what the page's controls send.

The body must name an event of the page with as many inputs as it takes, each a value its control
can hold (a number within its slider, one of a dropdown's current choices, a string for a text
box), and every file it names must be an upload of the page (``UploadedFiles``). Gradio would
otherwise fail on such input later, inside the event, with a traceback in the log; here it is a
400 naming the input.
"""

from __future__ import annotations

import json
import math
from typing import Any, Protocol

from api.ui.uploads import UploadedFiles, file_references
from errors import InvalidInputError

_SESSION_CHARS = 128


class _Fn(Protocol):
    fn: object
    inputs: list[Any]


class GradioApp(Protocol):
    """What the guard reads of Gradio's mounted app (its login tokens, its event table, its queue, its sessions)."""

    tokens: dict[str, str]
    cookie_id: str
    state_holder: Any

    def get_blocks(self) -> Any: ...


def check_join(gradio: GradioApp, files: UploadedFiles, body: bytes) -> None:
    """``InvalidInputError`` (or the upload's own error) unless ``body`` is a join the page could send."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidInputError("the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise InvalidInputError("the request body must be a JSON object")
    fn_index = payload.get("fn_index")
    fns: dict[int, _Fn] = gradio.get_blocks().fns
    fn = fns.get(fn_index) if type(fn_index) is int else None
    if fn is None or fn.fn is None:
        raise InvalidInputError("fn_index: not an event of this page", param="fn_index")
    data = payload.get("data")
    if not isinstance(data, list) or len(data) != len(fn.inputs):
        raise InvalidInputError(f"data: this event takes a list of {len(fn.inputs)} inputs", param="data")
    session = payload.get("session_hash")
    if not isinstance(session, str) or not 0 < len(session) <= _SESSION_CHARS:
        raise InvalidInputError("session_hash: a string of 1 to 128 characters is required", param="session_hash")
    trigger = payload.get("trigger_id")
    if trigger is not None and type(trigger) is not int:
        raise InvalidInputError("trigger_id: an integer or null", param="trigger_id")
    if payload.get("batched") or payload.get("simple_format"):
        raise InvalidInputError("the page sends neither batched nor simple-format events")
    _check_inputs(gradio, session, fn, data)
    for ref in file_references([data, payload.get("event_data")]):
        files.check(ref.get("path"), "data")
        if ref.get("is_stream"):
            raise InvalidInputError("data: the page sends no streamed inputs", param="data")


def _check_inputs(gradio: GradioApp, session: str, fn: _Fn, data: list[Any]) -> None:
    """Each value one its component's control can send, judged on the session's copy (choices change)."""
    holder = gradio.state_holder
    state = holder[session] if session in holder else None  # noqa: SIM401  # no .get(); [] makes one
    for i, (block, value) in enumerate(zip(fn.inputs, data, strict=True)):
        if getattr(block, "stateful", False):
            continue  # the server's own value is used, whatever the page sends
        current = state.get(block._id, block) if state is not None else block
        problem = _input_problem(type(current).__name__, current, value)
        if problem:
            raise InvalidInputError(f"data[{i}]: {problem}", param=f"data[{i}]")


def _input_problem(kind: str, block: Any, value: object) -> str | None:
    """Why ``value`` is not one the page's ``kind`` of control sends (None when it is, or the kind is not judged)."""
    if kind in ("Slider", "Number"):
        if value is None and kind == "Number":
            return None
        if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
            return "a finite number is required"
        low, high = getattr(block, "minimum", None), getattr(block, "maximum", None)
        if (low is not None and value < low) or (high is not None and value > high):
            return f"the number must be within {low} and {high}"
    elif kind == "Textbox" and value is not None and not isinstance(value, str):  # a hidden box sends null
        return "a string is required"
    elif kind in ("Dropdown", "Radio") and value is not None and not getattr(block, "allow_custom_value", False):
        choices = [choice for _, choice in getattr(block, "choices", [])]
        if isinstance(value, (dict, list)) or value not in choices:
            return "not one of the choices"
    elif kind == "Audio" and value is not None and not isinstance(value, dict):
        return "an uploaded file is required"
    return None
