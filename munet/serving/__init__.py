"""``munet serve``: a run's multitask system behind HTTP (FastAPI on uvicorn, the ``munet[serve]`` extra).

``app.py`` holds the routes and request limits, ``batcher.py`` the dynamic batching across requests and tasks,
``metrics.py`` the Prometheus metrics, ``server.py`` the uvicorn server (in the foreground or a thread)."""

from __future__ import annotations

import importlib.util

from munet.errors import MunetError

EXTRA_MODULES = ("fastapi", "uvicorn", "prometheus_client", "python_multipart")
MAX_WAIT_MS = 10_000  # a batch waits at most 10 s for more requests: longer looks like a hung server
MAX_READ_S = 3600  # a request body may take at most an hour to arrive


def require_serve_extra() -> None:
    """Checks that the ``serve`` extra is installed.

    Raises:
        MunetError: a package of the extra is missing; the message says how to install it.
    """
    missing = [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise MunetError(f"munet serve needs {', '.join(missing)}: install the serve extra with "
                         "`pip install -e .[serve]` (a checkout) or `pip install 'munet[serve]'`")
