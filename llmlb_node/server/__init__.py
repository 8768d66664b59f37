"""`llmlb-node serve`: an OpenAI-compatible inference node over LazyLlama and ModelResolver.

Needs the ``server`` extra (Starlette, uvicorn); importing `llmlb_node` alone never loads it.
"""

from __future__ import annotations

from .settings import ServerSettings

__all__ = ["ServerSettings", "serve"]

KEEP_ALIVE_TIMEOUT = 75
"""Seconds an idle keep-alive connection stays open. Longer than the llmlb load balancer's
pool keeps one idle (60 s): the client must be the side that closes it, or a request it sends
on a connection we are closing at that moment is reset (uvicorn's default is 5 s)."""


def serve(settings: ServerSettings) -> None:
    """Run the node in the foreground until SIGTERM or SIGINT, then shut down cleanly."""
    import os
    import sys

    import uvicorn

    # libgomp (llama.cpp's threads) spins waiting for work by default: on a machine shared with
    # other jobs that spinning steals the cores its own threads wait for, and every decode got
    # 5-50x slower at random. Passive waiting costs a wake-up per parallel region instead. Read
    # once, when llama.cpp's library loads: set it before anything imports llama_cpp.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from .app import create_app

    # A worker thread running llama-cpp-python's per-token Python code holds the GIL between
    # llama.cpp calls; the event loop waiting for it would wait up to the 5 ms default switch
    # interval per hand-over, several times per request. 1 ms keeps status routes quick.
    sys.setswitchinterval(0.001)
    from .shutdown import BACKSTOP, NodeServer

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,  # ours (llmlb_node.server.access) names the model and the tokens
        lifespan="on",
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
        timeout_graceful_shutdown=int(settings.shutdown_grace + BACKSTOP),
    )
    NodeServer(config, app.state.shutdown).run()
