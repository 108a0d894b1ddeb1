"""A local S3-compatible server for the tests and bench/scripts/s3_decode.py: moto's server mode
on the loopback address, behind a small proxy that counts what passes (requests, GETs, bytes
answered) and can misbehave on demand (throttle, stop answering, refuse credentials, go away), so
that the client's handling of each failure is tested against real HTTP."""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

THROTTLED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request '
             b'rate.</Message></Error>')
DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code><Message>The AWS Access Key Id you '
          b'provided does not exist in our records.</Message></Error>')


def start_moto() -> tuple[object, str]:
    """(the server, its URL)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


class FaultProxy:
    """Forwards every request to ``upstream`` unless told otherwise:

    - ``throttle(n)``: the next ``n`` requests get 503 SlowDown;
    - ``hang()``: requests are read and never answered;
    - ``deny()``: every request gets 403 InvalidAccessKeyId;
    - ``stop()``: the server goes away (connections are refused);
    - ``cut_after(n)``: it goes away when ``n`` more requests have been answered.

    ``requests`` counts what reached it; ``gets`` the GETs among them; ``bytes_out`` the bytes of
    the bodies it answered GETs with."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.throttled = 0
        self.hanging = False
        self.denying = False
        self.requests = 0
        self.gets = 0
        self.bytes_out = 0
        self.cut_in: int | None = None
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self.paths: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy._connections.add(self.connection)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

            def _answer(self, status: int, body: bytes, headers: list[tuple[str, str]] = ()) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                with proxy._lock:
                    proxy.requests += 1
                    proxy.gets += self.command == "GET"
                    proxy.paths.append(f"{self.command} {self.path}")
                    throttle = proxy.throttled > 0
                    proxy.throttled -= throttle
                    cut = proxy.cut_in is not None and proxy.cut_in <= 0
                    if proxy.cut_in is not None:
                        proxy.cut_in -= 1
                if cut:
                    if proxy.cut_in == -1:  # the first request past the cut: the server goes away
                        threading.Thread(target=proxy.stop, daemon=True).start()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if proxy.hanging:
                    time.sleep(3600)
                    return
                if proxy.denying:
                    return self._answer(403, DENIED, [("Content-Type", "application/xml")])
                if throttle:
                    return self._answer(503, THROTTLED, [("Content-Type", "application/xml")])
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if self.command == "GET":
                    with proxy._lock:
                        proxy.bytes_out += len(data)
                self._answer(resp.status, data, resp.getheaders())

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # a decode step's concurrent GETs queue, not refused

            def handle_error(self, request, client_address) -> None:  # noqa: ANN001 (a client gone midway: not news)
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def throttle(self, n: int) -> None:
        with self._lock:
            self.throttled = n

    def cut_after(self, n: int) -> None:
        with self._lock:
            self.cut_in = n

    def hang(self) -> None:
        self.hanging = True

    def deny(self) -> None:
        self.denying = True

    def stop(self) -> None:
        """Gone: the listening socket closed and every open connection cut (keep-alive ones too)."""
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()
        with socket.socket() as s:  # nothing listens there any more
            assert s.connect_ex(self._server.server_address) != 0
