"""The event loop and HTTP parser every uvicorn of ours runs on: asyncio and h11, named.

uvicorn's default ("auto") takes uvloop and httptools whenever they are installed. The ``ray``
extra installs both (Ray Serve needs ``uvicorn[standard]``), so without these names a venv with
the extra would run the single-process server on another loop and parser than the Docker image
runs it on, and than its tests saw: same code, different chunking, limits and error paths. Ray
Serve's proxy runs its own uvicorn; this pins ours.
"""

from __future__ import annotations

from typing import Final

LOOP: Final = "asyncio"
HTTP: Final = "h11"
