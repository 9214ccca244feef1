"""Running the server with uvicorn: in the foreground (``munet serve``) or in a background thread (tests,
benchmarks, a program that embeds it). The listening socket is bound first, so ``port = 0`` picks a free port and
the address printed is the one that answers."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path as FsPath
from typing import TextIO

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from munet.api import load
from munet.errors import MunetError
from munet.serving.app import Limits, create_app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0: a free one).

    Raises:
        OSError: the address is in use or cannot be bound.
    """
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY on accepted connections only for sockets that say so, and without
    # it a kept-alive connection waits 40 ms for each response's body (Nagle's algorithm meets delayed ACKs)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    """The ``http://host:port`` a bound socket answers on."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _HeaderTimeout(H11Protocol):
    """uvicorn's HTTP/1.1 connection, closed when a request's headers take longer than ``header_timeout`` seconds to
    arrive (counted from the connection's start or the previous response). uvicorn bounds only an idle kept-alive
    connection, and any byte received cancels that bound, so a client that sends half its headers held the
    connection forever; the app bounds the body itself (``Limits.read_timeout_s``)."""

    header_timeout = 30.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request's headers are in: the app takes over
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:  # waiting for the next request's headers (not already pipelined)
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def _uvicorn(app: FastAPI) -> uvicorn.Server:
    limits: Limits = app.state.limits
    protocol = type("HeaderTimeout", (_HeaderTimeout,), {"header_timeout": limits.read_timeout_s})
    # access lines would cost more than a tiny model's forward; /metrics counts the requests instead
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                                         http=protocol))


class BackgroundServer:
    """A server in a daemon thread of this process, as a context manager whose ``url`` answers once entered.

    Args:
        app: the application (:func:`munet.serving.app.create_app`).
        host: the address to listen on.
        port: the port (0: a free one).
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self._sock = bind(host, port)
        self.url = url_of(self._sock)
        self._server = _uvicorn(app)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()


def serve(run_dir: str | FsPath, host: str = "127.0.0.1", port: int = 8000, tasks: list[str] | None = None,
          limits: Limits | None = None, stream: TextIO | None = None) -> None:
    """Serves the last checkpoint of the run in ``run_dir`` until interrupted (a run still training is read as it
    was when the server started).

    Args:
        run_dir: the run directory.
        host, port: where to listen (``port`` 0: a free port, printed).
        tasks: the tasks to serve (default: all of the run's).
        limits: request and queue bounds (default: :class:`~munet.serving.app.Limits`'s).
        stream: where the address is announced (default: nowhere).

    Raises:
        MunetError: not a run, an unknown task, or an address that cannot be listened on.
    """
    system = load(run_dir)
    # each task once, also for "all,a"; an unknown task's error names the run's tasks
    served = list(dict.fromkeys(t for task in tasks or ["all"] for t in system.tasks_of(task)))
    app = create_app(system, served, limits or Limits())
    try:
        sock = bind(host, port)
    except OSError as err:  # in use, not this machine's, or no such host: the message names the address
        raise MunetError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err
    if stream is not None:
        state = "complete" if system.complete else "still training: serving its last checkpoint"
        print(f"serving {run_dir} ({state}; tasks {', '.join(served)}) on {url_of(sock)}", file=stream, flush=True)
    try:
        _uvicorn(app).run(sockets=[sock])
    finally:
        sock.close()
