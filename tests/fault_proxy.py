"""A loopback HTTP proxy in front of a real server that answers some requests with faults.

The only fake in the teacher tests, for faults a real `transformers serve` cannot produce on demand:

    with FaultProxy(upstream="http://127.0.0.1:8000", schedule=["429", "500", "timeout", "pass"]) as proxy:
        client = TeacherClient(TeacherSettings(base_url=proxy.base_url, ...))
        ...
        assert proxy.counts == {"429": 1, "500": 1, "timeout": 1, "pass": 1}

Each incoming HTTP request consumes the next action of the schedule (then "pass" forever):
  "pass"                  forward to the upstream and relay its answer
  "429", "500", "503"...  answer with that status and an OpenAI-style JSON error body
  "429;retry-after=0.5"   the same, with a Retry-After header (any status code works)
  "401;echo-auth"         the error message quotes the request's Authorization header back
  "timeout"               read the request, answer nothing for `hold_s`, then close the connection
  "reset"                 close the socket with a TCP RST (SO_LINGER 0) instead of answering
It records what it did (`counts`, `events` with arrival times, `answered`: answers written back
in full) and the most requests it had in flight at once. Bounded: loopback only, at most `max_connections` open connections, a hold never
longer than `hold_s`, and it shuts itself down after `lifetime_s` even if a test forgets to.
"""
from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "proxy-connection",
              "te", "trailer", "upgrade", "accept-encoding"}


@dataclass(frozen=True)
class Fault:
    kind: str  # "pass" | "timeout" | "reset" | "status"
    status: int = 0
    retry_after: str | None = None
    echo_auth: bool = False  # put the request's Authorization header in the error message, as careless servers do

    @property
    def label(self) -> str:
        return str(self.status) if self.kind == "status" else self.kind


def parse_action(action: str) -> Fault:
    name, *options = [part.strip() for part in action.split(";")]
    if name in ("pass", "timeout", "reset") and not options:
        return Fault(name)
    if not (name.isdigit() and 400 <= int(name) <= 599):
        raise ValueError(f"fault action {action!r}: expected pass, timeout, reset or an HTTP status 400-599 "
                         "(optionally '<status>;retry-after=<seconds>;echo-auth')")
    retry_after, echo_auth = None, False
    for option in options:
        key, _, value = option.partition("=")
        if key == "retry-after" and value:
            retry_after = value
        elif option == "echo-auth":
            echo_auth = True
        else:
            raise ValueError(f"fault action {action!r}: unknown option {option!r} "
                             "(known: retry-after=<seconds>, echo-auth)")
    return Fault("status", int(name), retry_after, echo_auth)


@dataclass(frozen=True)
class Event:
    at: float  # time.monotonic() when the request had been read
    action: str  # the label: "pass", "timeout", "reset", "429", ...
    path: str  # with its query string
    authorization: str | None = None  # the request's Authorization header, as sent


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a held or idle keep-alive connection never blocks interpreter exit
    allow_reuse_address = True
    proxy: "FaultProxy"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real server (the openai client pools connections)
    server: _Server

    def log_message(self, format: str, *args) -> None:  # quiet: tests read counts, not stderr
        pass

    def do_POST(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def _handle(self) -> None:
        proxy = self.server.proxy
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fault = proxy._next_fault(self.path, self.headers.get("Authorization"))
        try:
            if fault.kind == "pass":
                self._forward(body)
                self.wfile.flush()
                proxy._answered()
            elif fault.kind == "status":
                self._answer_fault(fault)
                proxy._answered()
            elif fault.kind == "timeout":
                proxy._stopping.wait(proxy.hold_s)  # hold, answering nothing; wakes early when the proxy stops
                self.close_connection = True
            else:  # reset: RST instead of an orderly FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
        finally:
            proxy._request_done()

    def _answer_fault(self, fault: Fault) -> None:
        message = f"injected fault {fault.status}"
        if fault.echo_auth:
            message += f"; you sent Authorization: {self.headers.get('Authorization')}"
        payload = json.dumps({"error": {"message": message, "type": "fault_proxy", "code": fault.status}}).encode()
        self.send_response(fault.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if fault.retry_after is not None:
            self.send_header("Retry-After", fault.retry_after)
        self.end_headers()
        self.wfile.write(payload)

    def _forward(self, body: bytes) -> None:
        proxy = self.server.proxy
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=proxy.upstream_timeout_s)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()  # de-chunked; we answer with a Content-Length
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError as exc:  # upstream down: say so, as a gateway would
            payload = json.dumps({"error": {"message": f"fault proxy: upstream error {exc}"}}).encode()
            self.send_response(502)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        finally:
            upstream.close()


class FaultProxy:
    def __init__(self, upstream: str, schedule: Iterable[str] = (), *, hold_s: float = 2.0,
                 max_connections: int = 64, lifetime_s: float = 300.0, upstream_timeout_s: float = 120.0):
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"FaultProxy upstream must be an http://host:port URL, got {upstream!r}")
        if not 0 < hold_s <= 60:
            raise ValueError(f"FaultProxy hold_s must be in (0, 60], got {hold_s}")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.schedule = [parse_action(a) for a in schedule]  # validated up front: a typo fails the test at once
        self.hold_s, self.max_connections = hold_s, max_connections
        self.lifetime_s, self.upstream_timeout_s = lifetime_s, upstream_timeout_s
        self.counts: Counter[str] = Counter()
        self.events: list[Event] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.answered = 0
        self.refused_connections = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Timer | None = None

    # --- what the handler calls ----------------------------------------------------------------
    def _next_fault(self, path: str, authorization: str | None = None) -> Fault:
        with self._lock:
            fault = self.schedule.pop(0) if self.schedule else Fault("pass")
            self.counts[fault.label] += 1
            self.events.append(Event(time.monotonic(), fault.label, path, authorization))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return fault

    def _answered(self) -> None:
        with self._lock:
            self.answered += 1

    def _request_done(self) -> None:
        with self._lock:
            self.in_flight -= 1

    # --- lifecycle ------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FaultProxy is not running; use it as a context manager")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def requests(self) -> int:
        return sum(self.counts.values())

    def start(self) -> "FaultProxy":
        proxy = self

        class Server(_Server):
            def verify_request(self, request, client_address) -> bool:
                with proxy._lock:
                    if len(proxy._connections) >= proxy.max_connections or proxy._stopping.is_set():
                        proxy.refused_connections += 1
                        return False
                    proxy._connections.add(request)
                return True

            def shutdown_request(self, request) -> None:
                with proxy._lock:
                    proxy._connections.discard(request)
                super().shutdown_request(request)

        self._server = Server(("127.0.0.1", 0), _Handler)  # loopback only, a free port
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        self._watchdog = threading.Timer(self.lifetime_s, self.stop)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def stop(self) -> None:
        """Stop accepting, wake held requests, close every open connection. Idempotent."""
        self._stopping.set()
        server, self._server = self._server, None
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.cancel()
        if server is None:
            return
        server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # idle keep-alive handlers are blocked reading: unblock them
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
