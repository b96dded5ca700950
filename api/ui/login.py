"""The throttle on the web UI's login: wrong keys cost time, per client address.

The login is the UI's only door with ``--api-key``, and Gradio checks a key as fast as it is
sent; without a throttle a guesser could try thousands a second.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class _Attempts:
    failures: int = 0
    locked_until: float = 0.0
    busy: bool = False


class LoginThrottle:
    """Wrong keys at the login cost time, per client address.

    The first ``free`` wrong keys answer at once (a typo); after that each wrong key locks the
    address out for ``base_s`` doubling per further wrong key, up to ``max_s``; while locked out, or
    while one of its attempts is still being answered, the address gets 429 with ``Retry-After``
    without its key being checked. So concurrency buys nothing, and guessing runs at about one key
    per ``max_s`` seconds. A correct key clears the address's record. The table keeps at most
    ``max_clients`` addresses (the idle ones first make room).
    """

    def __init__(self, *, free: int = 3, base_s: float = 1.0, max_s: float = 60.0, max_clients: int = 4096) -> None:
        self.free = free
        self.base_s = base_s
        self.max_s = max_s
        self.max_clients = max_clients
        self._table: OrderedDict[str, _Attempts] = OrderedDict()

    def admit(self, client: str) -> float | None:
        """None: go on and check the key (``done`` must follow); else the seconds to wait."""
        now = time.monotonic()
        record = self._table.get(client)
        if record is not None and (record.busy or now < record.locked_until):
            return max(record.locked_until - now, 1.0)
        if record is None:
            self._make_room(now)
            record = self._table[client] = _Attempts()
        self._table.move_to_end(client)
        record.busy = True
        return None

    def done(self, client: str, *, ok: bool) -> None:
        record = self._table.get(client)
        if record is None:
            return
        record.busy = False
        if ok:
            del self._table[client]
            return
        record.failures += 1
        if record.failures >= self.free:
            delay = min(self.base_s * 2 ** (record.failures - self.free), self.max_s)
            record.locked_until = time.monotonic() + delay

    def _make_room(self, now: float) -> None:
        if len(self._table) < self.max_clients:
            return
        for client, record in list(self._table.items()):  # oldest first
            if not record.busy and record.locked_until <= now:
                del self._table[client]
                if len(self._table) < self.max_clients:
                    return
        self._table.popitem(last=False)
