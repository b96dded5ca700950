"""What a page shows when a handler fails: the API's error sentence, never a traceback.

Every handler of the page runs through ``guarded`` (or ``guarded_stream``), so a bad input reads
as the API's envelope would say it, with its status in the title, and an unexpected error reads
"internal server error" while the operator gets the traceback in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

import gradio as gr
from pydantic import ValidationError

from api.errors import status_of, validation_message
from errors import StepAudioError

logger = logging.getLogger(__name__)

_STATUS_TITLES = {
    400: "Invalid input",
    401: "Unauthorized",
    404: "Not found",
    413: "Too large",
    429: "Busy",
    503: "Not ready",
}


def user_error(exc: BaseException) -> gr.Error:
    """The message a page shows for ``exc``: the API's error sentence, never a traceback."""
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, StepAudioError):
        status = status_of(exc)
        title = _STATUS_TITLES.get(status, "Server error")
        return gr.Error(str(exc), title=f"{title} ({status})", duration=None, print_exception=False)
    if isinstance(exc, ValidationError):
        message, _ = validation_message([dict(e) for e in exc.errors()])
        return gr.Error(message, title="Invalid input (400)", duration=None, print_exception=False)
    logger.exception("web UI: unexpected error: %s", exc)
    return gr.Error("internal server error (see the server log)", title="Server error (500)", duration=None)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run an async handler with every failure turned into a ``user_error`` (Gradio reads the signature)."""

    @functools.wraps(fn)  # Gradio reads the wrapped signature (inputs, the Progress parameter)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise user_error(exc) from None

    return wrapper


def guarded_stream(fn: Callable[..., AsyncGenerator[Any, None]]) -> Callable[..., AsyncGenerator[Any, None]]:
    """``guarded`` for an async generator handler; closing it closes ``fn``'s generator at once."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        try:
            async with contextlib.aclosing(fn(*args, **kwargs)) as updates:
                async for update in updates:
                    yield update
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            raise user_error(exc) from None

    return wrapper
