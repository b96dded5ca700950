"""Entry point: settings (CLI > env > defaults) -> ``api.create_app`` -> uvicorn.

    python api_server.py --model-path /models --enable-auto-transcribe --api-port 8003
    python api_server.py --demo --api-port 8003      # tiny random-weight bundle: noise, for trying the API

The port is bound at once; the models load in the background (``/readyz`` says when).
"""

from __future__ import annotations

import logging

from api.app import create_app
from api.demo import DEMO_NOTICE
from api.logs import LOG_FORMAT
from api.serve import serve
from settings import Settings

logger = logging.getLogger("api_server")


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_cli(argv)
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    if settings.demo:
        banner = "=" * 78
        logger.warning(
            "\n%s\nDEMO MODE: %s.\nEvery response carries the header X-Step-Audio-Demo.\n"
            "Serve real weights with --model-path (see models/README.md).\n%s",
            banner,
            DEMO_NOTICE,
            banner,
        )
    app = create_app(settings)
    if settings.ui:
        logger.info("web UI: http://localhost:%d/ui (--no-ui turns it off)", settings.api_port)
    # a stop signal ends the process within api.serve.HARD_STOP_S, whatever a request is doing
    serve(app, host=settings.api_host, port=settings.api_port, log_level=settings.log_level.lower())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
