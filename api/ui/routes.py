"""The routes the web UI's page uses, and nothing else: the guard's allow-list.

Gradio's app serves much more than the page needs (its programmatic API and API docs, a URL
proxy, monitoring, ...). The list below was read off a real browser session; every other path
under the mount is a 404, another method a 405.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PageRoute:
    """A route the page uses, as an OpenAPI-style template under the mount (``{name:path}`` spans slashes)."""

    methods: frozenset[str]
    template: str
    login: bool = True  # with --api-key, only a logged-in page may call it
    pattern: re.Pattern[str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        kinds = {"path": ".+", "int": "[0-9]+"}
        regex = ""
        for literal, name in re.findall(r"([^{]*)(\{[^}]*\})?", self.template):
            regex += re.escape(literal)
            if name:
                kind = name[1:-1].partition(":")[2]
                regex += kinds.get(kind, "[^/]+")
        object.__setattr__(self, "pattern", re.compile(regex + r"\Z"))


def _route(methods: str, template: str, *, login: bool = True) -> PageRoute:
    return PageRoute(frozenset(methods.split()), template, login)


JOIN = "/gradio_api/queue/join"
LOGIN = "/login"
FILE = "/gradio_api/file={path:path}"
QUEUE_DATA = "/gradio_api/queue/data"

# Every request a browser session makes (open, log in, clone, upload, edit, live playback, voices,
# cache, log panel, cancel), and nothing else. The page's static files and the login form are open.
PAGE_ROUTES: tuple[PageRoute, ...] = (
    _route("GET HEAD", "/", login=False),
    _route("GET HEAD", "/assets/{path:path}", login=False),
    _route("GET HEAD", "/static/{path:path}", login=False),
    _route("GET HEAD", "/theme.css", login=False),
    _route("POST", LOGIN, login=False),
    _route("GET", "/logout", login=False),
    _route("GET", "/config"),
    _route("POST", JOIN),
    _route("GET", QUEUE_DATA),
    _route("GET", "/gradio_api/heartbeat/{session_hash}"),
    _route("POST", "/gradio_api/upload"),
    _route("GET", "/gradio_api/upload_progress"),
    _route("GET HEAD", FILE),
    _route("GET", "/gradio_api/stream/{session_hash}/{run}/{component_id:int}/{segment}"),
    _route("POST", "/gradio_api/cancel"),
    _route("POST", "/gradio_api/reset"),
)


def match(path: str, method: str) -> tuple[list[PageRoute], PageRoute | None]:
    """The page's routes whose template matches ``path``, and the one among them that takes ``method``."""
    routes = [r for r in PAGE_ROUTES if r.pattern.match(path)]
    return routes, next((r for r in routes if method in r.methods), None)
