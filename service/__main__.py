"""python -m service: serve with uvicorn, settings from M2REC_* environment variables."""

from __future__ import annotations

import uvicorn

from service.config import Settings


def main() -> None:
    settings = Settings()
    # the factory builds its own Settings from the same environment inside the server process
    uvicorn.run("service.api.app:create_app", factory=True, host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
