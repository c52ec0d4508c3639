"""Runs app.py under uvicorn on a port it binds itself, and says which once it serves.

    python serve.py [--host 127.0.0.1] [--port 0]

Port 0 (the default) takes a free port. Once uvicorn accepts requests this prints one line,
`nexus test backend ready on http://HOST:PORT`, on stdout: tests/js/backend_harness.js waits
for it. A missing Python package exits 3 naming it (tests/backend/venv.sh installs them).
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

REQUIRED = {"fastapi": "fastapi", "uvicorn": "uvicorn", "jwt": "pyjwt"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    for module, package in REQUIRED.items():
        try:
            __import__(module)
        except ImportError as err:
            print(
                f"tests/backend: missing Python package `{package}` ({err}); "
                "run `bash tests/backend/venv.sh` (installs tests/backend/requirements.txt)",
                file=sys.stderr,
            )
            return 3

    import uvicorn

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from app import app  # noqa: E402  (after the package check, and needs JWT_SECRET/PROXY_SECRET)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if not self.should_exit:
                print(f"nexus test backend ready on http://{host}:{port}", flush=True)

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        # In-flight slow-mode answers do not hold a stop up.
        timeout_graceful_shutdown=1,
    )
    Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
