"""A server on a loopback port inside this process, for tests and benchmarks.

with local_server(ServerConfig(engines=folder)) as url:
    httpx.get(f"{url}/v1/health/ready")
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn

from runtime.server.app import create_app
from runtime.server.state import ServerConfig, State


@contextlib.contextmanager
def local_server(
    config: ServerConfig,
    *,
    ready_timeout: float = 120.0,
    wait_ready: bool = True,
    state: State | None = None,
):
    """Run the app on 127.0.0.1 (a free port) in a thread; yields its base URL. `state`: the
    app's (made from `config` when not given), for a caller that inspects it."""
    app = create_app(config, state=state)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    state = app.state.blip3o
    deadline = time.monotonic() + ready_timeout
    while wait_ready and not state.ready:
        if state.failure:
            raise RuntimeError(f"the server did not start: {state.failure}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server was not ready after {ready_timeout} s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
