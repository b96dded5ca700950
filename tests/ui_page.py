"""The web UI's own protocol, spoken as its page speaks it: for tests that drive the UI without a browser.

The page runs an event by posting ``queue/join`` (the event's ``fn_index``, its input values and
the page's ``session_hash``) and reading the event's messages from ``queue/data`` (server-sent
events); a file goes up through ``upload`` first and is then named by the path Gradio answers.
The server closes Gradio's programmatic API (``gradio_client`` cannot connect), so these tests
send exactly what a browser sends, through the same guard.

Events are found as the page finds them: by the element that triggers them (``elem_id``) and the
trigger (``click``, ``change``, ...). One ``UiPage`` is one page session: run its events one at
a time (a second page for concurrent ones), as each event's messages come on the session's stream.
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
from gradio_client.utils import apply_diff


class PageError(Exception):
    """The error the page would show for an event (the handler's ``gr.Error``)."""

    def __init__(self, message: str, title: str | None) -> None:
        super().__init__(f"{title}: {message}" if title else message)
        self.message = message
        self.title = title


class UiPage:
    """A page session on ``base_url``'s web UI; ``key`` logs in first as the login page does."""

    def __init__(self, base_url: str, *, key: str | None = None, timeout_s: float = 300.0) -> None:
        self.base_url = base_url
        self.http = httpx.Client(base_url=f"{base_url}/ui", timeout=timeout_s)
        if key is not None:
            self.http.post("/login", data={"username": "page", "password": key}).raise_for_status()
        self.config = self.http.get("/config").raise_for_status().json()
        self.session_hash = uuid.uuid4().hex[:11]
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> UiPage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fn_index(self, elem_id: str, trigger: str = "click") -> int:
        ids = {c["id"] for c in self.config["components"] if c.get("props", {}).get("elem_id") == elem_id}
        for dep in self.config["dependencies"]:
            if any(target[0] in ids and target[1] == trigger for target in dep["targets"]):
                return int(dep["id"])
        raise KeyError(f"no {trigger} event on #{elem_id}")

    def upload(self, path: str | Path) -> dict[str, Any]:
        """Upload a file as the page's audio input does; the value the page then sends for it."""
        path = Path(path)
        response = self.http.post("/gradio_api/upload", files=[("files", (path.name, path.read_bytes()))])
        stored = response.raise_for_status().json()[0]
        return {"path": stored, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}

    def join(self, fn_index: int, data: list[Any], **extra: Any) -> httpx.Response:
        body = {"data": data, "fn_index": fn_index, "session_hash": self.session_hash, "event_data": None, **extra}
        return self.http.post("/gradio_api/queue/join", json=body)

    def submit(self, elem_id: str, *data: Any, trigger: str = "click") -> PageEvent:
        fn_index = self.fn_index(elem_id, trigger)
        joined = self.join(fn_index, list(data)).raise_for_status().json()
        return PageEvent(self, fn_index, joined["event_id"])

    def run(self, elem_id: str, *data: Any, trigger: str = "click") -> list[Any]:
        """Run an event to its end: its outputs' final values (PageError if it failed)."""
        return self.submit(elem_id, *data, trigger=trigger).result(self.timeout_s)

    def fetch(self, value: dict[str, Any]) -> bytes:
        """The bytes of a file output, from the URL the page plays it from."""
        url = value["url"]
        return self.http.get(url if url.startswith("http") else f"{self.base_url}{url}").raise_for_status().content


class PageEvent:
    """One running event: its streamed outputs as they arrive, then its result."""

    def __init__(self, page: UiPage, fn_index: int, event_id: str) -> None:
        self.page = page
        self.fn_index = fn_index
        self.event_id = event_id
        self._outputs: list[list[Any]] = []
        self._final: dict[str, Any] | None = None
        self._ended = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            params = {"session_hash": self.page.session_hash}
            with self.page.http.stream("GET", "/gradio_api/queue/data", params=params) as stream:
                current: list[Any] | None = None
                for line in stream.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    message = json.loads(line[5:])
                    if message.get("event_id") not in (None, self.event_id):
                        continue
                    kind = message.get("msg")
                    if kind == "process_generating":
                        data = message["output"]["data"]
                        if current is None:
                            current = list(data)
                        else:
                            current = [apply_diff(c, d) for c, d in zip(current, data, strict=True)]
                        self._outputs.append(current)
                    elif kind == "process_completed":
                        self._final = message
                        return
                    elif kind in ("close_stream", "unexpected_error"):
                        self._final = self._final or message
                        return
        finally:
            self._ended.set()

    def outputs(self) -> list[list[Any]]:
        """Every streamed update so far, each the full output values (the page applies the diffs likewise)."""
        return list(self._outputs)

    def done(self) -> bool:
        return self._ended.is_set()

    def result(self, timeout_s: float = 300.0) -> list[Any]:
        if not self._ended.wait(timeout_s):
            raise TimeoutError(f"the event did not end within {timeout_s:g} s")
        final = self._final or {}
        output = final.get("output") or {}
        if final.get("msg") != "process_completed" or not final.get("success", False):
            raise PageError(str(output.get("error") or final.get("message") or final), output.get("title"))
        return list(output["data"])

    def cancel(self) -> None:
        """What the page sends when an event is stopped: ``cancel`` then ``reset``."""
        body = {"session_hash": self.page.session_hash, "fn_index": self.fn_index, "event_id": self.event_id}
        self.page.http.post("/gradio_api/cancel", json=body).raise_for_status()
        self.page.http.post("/gradio_api/reset", json={"event_id": self.event_id}).raise_for_status()
