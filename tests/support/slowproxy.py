"""A TCP proxy on loopback that slows what a server sends: a slow registry, made of the
real one, so that a test can interrupt a pull mid-way for sure."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

CHUNK = 16 << 10


class SlowProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream`` (``host:port``); the upstream's
    answers go at most ``rate`` bytes per second per connection (``None``: full speed,
    which may be set at any time)."""

    def __init__(self, upstream: str, rate: int | None) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.rate = rate
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._start(self._accept)

    def close(self) -> None:
        """Stop listening and cut every connection."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(10)

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self._sockets += [client, server]
            self._start(self._pump, client, server, False)
            self._start(self._pump, server, client, True)

    def _pump(self, source: socket.socket, sink: socket.socket, slow: bool) -> None:
        try:
            while data := source.recv(CHUNK):
                rate = self.rate if slow else None
                started = time.monotonic()
                sink.sendall(data)
                if rate:
                    time.sleep(max(0.0, len(data) / rate - (time.monotonic() - started)))
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
