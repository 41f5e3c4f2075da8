"""A loopback Batch API (`/v1/files`, `/v1/batches`) in front of a real OpenAI-compatible server.

No local server speaks the Batch protocol, so this emulates the protocol only: every input line is
executed against the real upstream (`transformers serve` on the tiny Llama) and its real answer is
written to the output file, in OpenAI's formats. The project talks to it through the real `openai`
client.

    with BatchServer(upstream="http://127.0.0.1:8000", api_key="sk-test") as api:
        api.plans.append(Plan(fail_lines={1}))      # the next batch created: its line 1 fails
        ...                                          # base_url = api.base_url
        assert api.created == [...]; api.retrieves   # what the client did

A `Plan` (per created batch, in order; then the default) can fail chosen lines (an error-file line
with HTTP 500), expire the batch after N lines (the rest as `batch_expired` lines, as OpenAI does),
or hold the batch `in_progress` until `release()` (so a client can be killed while polling).
Bounded: loopback only, daemon threads, shuts itself down on exit.
"""
from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.request import Request, urlopen
from urllib.error import HTTPError


@dataclass
class Plan:
    fail_lines: set = field(default_factory=set)   # line indices answered with an HTTP 500 error line
    expire_after: int | None = None                # run this many lines, then expire
    hold: bool = False                             # stay in_progress until BatchServer.release()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class BatchServer:
    def __init__(self, upstream: str, api_key: str | None = None):
        self.upstream = upstream.rstrip("/")
        self.api_key = api_key
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.plans: deque[Plan] = deque()
        self.created: list[str] = []              # batch ids, in creation order
        self.keys: dict[str, list[str]] = {}      # batch id -> custom_ids of its input
        self.answered: dict[str, list[str]] = {}  # batch id -> custom_ids it answered (200)
        self.retrieves: list[tuple[float, str]] = []
        self.refused = 0                          # requests answered 401
        self._gate = threading.Event()
        self._gate.set()
        self._lock = threading.Lock()
        self._http = _Server(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}/v1"

    def __enter__(self) -> "BatchServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._gate.set()
        self._http.shutdown()
        self._http.server_close()

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    # --- state ----------------------------------------------------------------------------------
    def _file(self, data: bytes, purpose: str, filename: str) -> dict:
        file_id = f"file-{uuid.uuid4().hex[:16]}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                               "filename": filename, "purpose": purpose, "status": "processed", "data": data}
        return self.public(self.files[file_id])

    @staticmethod
    def public(record: dict) -> dict:
        return {k: v for k, v in record.items() if k != "data"}

    def _create_batch(self, body: dict) -> tuple[int, dict]:
        source = self.files.get(body.get("input_file_id"))
        if source is None:
            return 404, {"error": {"message": f"No such File object: {body.get('input_file_id')}",
                                   "type": "invalid_request_error"}}
        lines = [json.loads(raw) for raw in source["data"].decode().splitlines() if raw.strip()]
        batch_id = f"batch_{uuid.uuid4().hex[:16]}"
        batch = {"id": batch_id, "object": "batch", "endpoint": body.get("endpoint"), "errors": None,
                 "input_file_id": source["id"], "completion_window": body.get("completion_window", "24h"),
                 "status": "validating", "output_file_id": None, "error_file_id": None,
                 "created_at": int(time.time()), "in_progress_at": None, "expires_at": int(time.time()) + 86400,
                 "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
                 "cancelled_at": None, "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                 "metadata": body.get("metadata")}
        plan = self.plans.popleft() if self.plans else Plan()
        with self._lock:
            self.batches[batch_id] = batch
            self.created.append(batch_id)
            self.keys[batch_id] = [line["custom_id"] for line in lines]
            self.answered[batch_id] = []
        threading.Thread(target=self._execute, args=(batch, lines, plan), daemon=True).start()
        return 200, batch

    def _execute(self, batch: dict, lines: list[dict], plan: Plan) -> None:
        batch.update(status="in_progress", in_progress_at=int(time.time()))
        if plan.hold:
            self._gate.wait()
        out, err = [], []
        for index, line in enumerate(lines):
            key = line["custom_id"]
            stop = "cancelled" if batch["status"] == "cancelling" else \
                "expired" if plan.expire_after is not None and index >= plan.expire_after else None
            if stop:
                err.append({"id": f"batch_req_{uuid.uuid4().hex[:12]}", "custom_id": key, "response": None,
                            "error": {"code": f"batch_{stop}", "message": f"This request could not be executed "
                                                                          f"before the batch was {stop}."}})
                continue
            if index in plan.fail_lines:
                status, body = 500, {"error": {"message": "simulated server error", "type": "server_error"}}
            else:
                status, body = self._forward(line["url"], line["body"])
            record = {"id": f"batch_req_{uuid.uuid4().hex[:12]}", "custom_id": key, "error": None,
                      "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body}}
            (out if status == 200 else err).append(record)
            if status == 200:
                self.answered[batch["id"]].append(key)
            batch["request_counts"]["completed" if status == 200 else "failed"] += 1
        now = int(time.time())
        if out:
            batch["output_file_id"] = self._file("".join(json.dumps(r) + "\n" for r in out).encode(),
                                                 "batch_output", "output.jsonl")["id"]
        if err:
            batch["error_file_id"] = self._file("".join(json.dumps(r) + "\n" for r in err).encode(),
                                                "batch_output", "errors.jsonl")["id"]
        if batch["status"] == "cancelling":
            batch.update(status="cancelled", cancelled_at=now)
        elif plan.expire_after is not None and plan.expire_after < len(lines):
            batch.update(status="expired", expired_at=now)
        else:
            batch.update(status="completed", completed_at=now)

    def _forward(self, url: str, body: dict) -> tuple[int, dict]:
        path = url[len("/v1"):] if url.startswith("/v1") else url
        request = Request(f"{self.upstream}/v1{path}", data=json.dumps(body).encode(),
                          headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except HTTPError as exc:
            return exc.code, {"error": {"message": exc.read().decode(errors="replace")[:300]}}
        except OSError as exc:  # the upstream is down: the line fails, as a real endpoint's would
            return 502, {"error": {"message": f"upstream unreachable: {exc}"}}

    # --- HTTP -----------------------------------------------------------------------------------
    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, payload, raw: bool = False) -> None:
                data = payload if raw else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream" if raw else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if api.api_key is None or self.headers.get("Authorization") == f"Bearer {api.api_key}":
                    return True
                api.refused += 1
                self._send(401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                           "code": "invalid_api_key"}})
                return False

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self) -> None:
                if not self._authorized():
                    return
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["v1", "files"] and len(parts) == 4 and parts[3] == "content" and parts[2] in api.files:
                    return self._send(200, api.files[parts[2]]["data"], raw=True)
                if parts[:2] == ["v1", "files"] and len(parts) == 3 and parts[2] in api.files:
                    return self._send(200, api.public(api.files[parts[2]]))
                if parts == ["v1", "batches"]:
                    data = [api.batches[b] for b in reversed(api.created)]
                    return self._send(200, {"object": "list", "data": data, "has_more": False,
                                            "first_id": data[0]["id"] if data else None,
                                            "last_id": data[-1]["id"] if data else None})
                if parts[:2] == ["v1", "batches"] and len(parts) == 3 and parts[2] in api.batches:
                    api.retrieves.append((time.time(), parts[2]))
                    return self._send(200, api.batches[parts[2]])
                self._send(404, {"error": {"message": f"not found: {self.path}", "type": "invalid_request_error"}})

            def do_POST(self) -> None:
                body = self._body()
                if not self._authorized():
                    return
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts == ["v1", "files"]:
                    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                        b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
                    fields = {part.get_param("name", header="content-disposition"): part
                              for part in message.iter_parts()}
                    upload = fields["file"]
                    return self._send(200, api._file(upload.get_payload(decode=True),
                                                      fields["purpose"].get_content().strip(),
                                                      upload.get_filename() or "input.jsonl"))
                if parts == ["v1", "batches"]:
                    return self._send(*api._create_batch(json.loads(body)))
                if parts[:2] == ["v1", "batches"] and len(parts) == 4 and parts[3] == "cancel" \
                        and parts[2] in api.batches:
                    batch = api.batches[parts[2]]
                    if batch["status"] in ("validating", "in_progress"):
                        batch.update(status="cancelling", cancelling_at=int(time.time()))
                    return self._send(200, batch)
                self._send(404, {"error": {"message": f"not found: {self.path}", "type": "invalid_request_error"}})

        return Handler
