"""Entry point: settings -> app -> uvicorn. The HTTP layer lands with the API issue."""

from __future__ import annotations

import sys

from settings import Settings


def main(argv: list[str] | None = None) -> int:
    Settings.from_cli(argv)
    print("api_server: the HTTP API is not built yet (see issue 5); nothing to serve.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
