"""python -m service: serve with uvicorn, settings from M2REC_* environment variables."""

from __future__ import annotations

import logging

import uvicorn

from service.config import Settings


def main() -> None:
    settings = Settings()
    # the service's own INFO lines (start-up, index build and re-embedding progress) on stderr; uvicorn's
    # loggers keep their own handlers and do not propagate here
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # the factory builds its own Settings from the same environment inside the server process
    uvicorn.run("service.api.app:create_app", factory=True, host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
