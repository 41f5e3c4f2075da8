"""The Batch API (`/v1/files` + `/v1/batches`): half the price of synchronous requests, answered
within 24 h. Pure parts first (batch input lines, which keys may go into a new batch, reading output
and error lines), then `BatchAPI`, the few calls we make through the `openai` client.

A request key is the line's `custom_id`. A key is never put into a second batch while an open batch
holds it or while a finished batch holds an answer for it that is not stored yet; only keys whose
batch ended without running them (expired, cancelled, a failed batch) or whose line failed go again.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Callable, Iterable, Mapping

import openai

from instructflow.tasks.secrets import public_url, real_endpoint
from instructflow.tasks.teacher import (RESPONSE_TYPES, TeacherClient, TeacherRequest, TeacherResult, TeacherSettings,
                                       redact, request_body, status_detail)
from instructflow.warehouse import queries
from instructflow.warehouse.store import Warehouse

logger = logging.getLogger(__name__)

ENDPOINTS = {api: "/v1" + path for api, (path, _) in RESPONSE_TYPES.items()}
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# OpenAI writes the lines a batch did not run to its error file with these codes: not failures of the
# request, so the key is resubmitted rather than stored as failed.
NOT_RUN_CODES = frozenset({"batch_expired", "batch_cancelled", "batch_failed"})
COMPLETION_WINDOW = "24h"  # the only window the Batch API offers
MAX_LINES = 50_000  # the Batch API's limit of requests per batch


def batch_price_table(prices: Mapping[str, Any], batch_prices: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """USD per 1M (prompt, completion) tokens in batch mode: `batch_prices`, else half of `prices`."""
    table = {model: (float(p) / 2, float(c) / 2) for model, (p, c) in prices.items()}
    table.update({model: (float(p), float(c)) for model, (p, c) in batch_prices.items()})
    return table


def batch_line(request: TeacherRequest, settings: TeacherSettings) -> dict:
    """One input line: the body a synchronous request would send."""
    return {"custom_id": request.key, "method": "POST", "url": ENDPOINTS[settings.api],
            "body": request_body(settings, request.prompt, request.params)}


def encode_jsonl(lines: Iterable[dict]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")


def _line_error(line: dict) -> tuple[str | None, str | None]:
    """(error message, error code) of one output/error line; (None, None) for a 200 answer."""
    error = line.get("error")
    if isinstance(error, dict) and (error.get("message") or error.get("code")):
        return f"{error.get('code') or 'error'}: {error.get('message') or ''}".strip(), error.get("code")
    response = line.get("response") or {}
    status = int(response.get("status_code") or 0)
    if status == 200 and isinstance(response.get("body"), dict):
        return None, None
    body = response.get("body")
    detail = body.get("error", {}).get("message") if isinstance(body, dict) and isinstance(body.get("error"), dict) \
        else json.dumps(body, default=str)[:300]
    code = body.get("error", {}).get("code") if isinstance(body, dict) and isinstance(body.get("error"), dict) else None
    return f"HTTP {status}: {detail}", code


def line_outcomes(keys: Iterable[str], output_text: str, error_text: str, batch_error: str | None,
                  status: str) -> list[tuple[str, dict | None, str | None, bool]]:
    """(key, response body, error, missing) for every key of a finished batch. `missing`: the batch
    ended before the line ran (not stored as a failed request; the key goes into a new batch)."""
    answers: dict[str, tuple[dict | None, str | None, bool]] = {}
    for text in (output_text, error_text):
        for raw in text.splitlines():
            if not raw.strip():
                continue
            line = json.loads(raw)
            key = line.get("custom_id")
            if not isinstance(key, str) or (key in answers and answers[key][0] is not None):
                continue  # an answer wins over an error line for the same key
            error, code = _line_error(line)
            answers[key] = ((line["response"]["body"], None, False) if error is None
                            else (None, error, code in NOT_RUN_CODES))
    reason = batch_error or f"batch {status} before this line ran"
    return [(key, *answers.get(key, (None, reason, True))) for key in keys]


def keys_free_for_batch(keys: Iterable[str], states: Mapping[str, Mapping]) -> tuple[list[str], list[str]]:
    """(keys that may go into a new batch, keys held by an open batch or by an answer not stored yet).
    `states`: `queries.batch_key_states`, the newest batch line of each key."""
    free, held = [], []
    for key in keys:
        state = states.get(key)
        open_or_unstored = state is not None and (
            state["collected_at"] is None or (state["response"] is not None and not state["stored"]))
        (held if open_or_unstored else free).append(key)
    return free, held


# ---------------------------------------------------------------------------------------------
# I/O: the openai client's files and batches APIs

class BatchAPIError(RuntimeError):
    """The endpoint refused or failed a Batch API call: one line, the key redacted."""


class BatchAPI:
    def __init__(self, settings: TeacherSettings):
        self.settings = settings
        # the client's own retries are on here: these are few, idempotent-enough control calls
        self.client = openai.OpenAI(**settings.openai_client_args(), max_retries=3, timeout=settings.timeout_s)

    def close(self) -> None:
        self.client.close()

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except openai.APIStatusError as exc:
            message = f"{what}: HTTP {exc.status_code}: {status_detail(exc)}"
            raise BatchAPIError(redact(message, self.settings.api_key)) from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc.__context__
            message = f"{what}: connection error: {cause or exc.message}"
            raise BatchAPIError(redact(message, self.settings.api_key)) from None

    def upload(self, data: bytes) -> str:
        return self._call("upload batch input", self.client.files.create,
                          file=("instructflow-batch.jsonl", data, "application/jsonl"), purpose="batch").id

    def create(self, input_file_id: str, metadata: dict | None = None):
        return self._call("create batch", self.client.batches.create, input_file_id=input_file_id,
                          endpoint=ENDPOINTS[self.settings.api], completion_window=COMPLETION_WINDOW,
                          metadata=metadata)

    def retrieve(self, batch_id: str):
        return self._call(f"poll batch {batch_id}", self.client.batches.retrieve, batch_id)

    def cancel(self, batch_id: str):
        return self._call(f"cancel batch {batch_id}", self.client.batches.cancel, batch_id)

    def content(self, file_id: str) -> str:
        return self._call(f"download file {file_id}", self.client.files.content, file_id).text

    def find_by_input(self, input_file_id: str):
        """The batch created from this input file (a run killed before recording its id), or None."""
        page = self._call("list batches", self.client.batches.list, limit=100)
        for batch in page:  # iterating a page fetches the next ones
            if batch.input_file_id == input_file_id:
                return batch
        return None


class BatchFailed(RuntimeError):
    """A batch cannot be collected here (failed as a whole, or open at another endpoint): one line."""


class BatchJobs:
    """One stage's batches in the warehouse: `submit` uploads and creates one, `finish_open` polls every
    batch of the stage still open (a killed run's too) to its end and downloads its lines, `answered`
    gives the lines collected but not stored yet, and `result_of` turns one into the TeacherResult a
    synchronous request would have produced (priced at the batch rates)."""

    def __init__(self, wh: Warehouse, stage: str, settings: TeacherSettings, batch_prices: Mapping[str, Any],
                 poll_s: float, on_status: Callable[[str], None] | None = None):
        self.wh, self.stage, self.settings, self.poll_s = wh, stage, settings, poll_s
        self.on_status = on_status or (lambda line: None)
        self.results = TeacherClient(dataclasses.replace(
            settings, prices=batch_price_table(settings.prices, batch_prices)))
        self.api = BatchAPI(settings)

    def close(self) -> None:
        self.api.close()

    def states(self) -> dict[str, dict]:
        return queries.batch_key_states(self.wh, self.stage)

    def answered(self) -> dict[str, dict]:
        """key -> its collected line (an answer or a failed line) not stored in teacher_requests yet."""
        return {k: s for k, s in self.states().items()
                if s["collected_at"] is not None and not s["stored"] and not s["missing"]}

    @staticmethod
    def request_of(state: dict) -> TeacherRequest:
        """The request a batch line was made from (its state row holds key, prompt and params)."""
        return TeacherRequest(key=state["request_key"], prompt=state["prompt"], params=state["params"])

    def result_of(self, state: dict) -> TeacherResult:
        request = self.request_of(state)
        body = state["response"]
        response = None
        if body is not None:
            model = RESPONSE_TYPES[self.settings.api][1]
            response = model.construct(**body)
        # a batch line has no round trip of its own: latency 0, one attempt
        return self.results.result_from_response(request, dict(request.params), response, state["error"], 1, 0.0)

    def submit(self, requests: list[tuple[TeacherRequest, str, dict]]) -> None:
        """(request, purpose, what handling its answer needs) lines as one new batch."""
        s = self.settings
        input_file_id = self.api.upload(encode_jsonl(batch_line(request, s) for request, _, _ in requests))
        queries.record_batch_input(self.wh, input_file_id, self.stage, s.endpoint,
                                   [(r.key, purpose, r.prompt, dict(r.params), meta) for r, purpose, meta in requests])
        self._create(input_file_id)

    def finish_open(self) -> None:
        for row in queries.open_batches(self.wh, self.stage):
            batch_id = row["batch_id"]
            if public_url(row["endpoint"]) != self.settings.endpoint:  # stored masked (older homes: as given)
                raise BatchFailed(f"batch {batch_id or row['input_file_id']} is open at {public_url(row['endpoint'])}, "
                                  f"not at teacher.endpoint {self.settings.endpoint}: point teacher.endpoint back "
                                  f"at it so it is collected, or `instructflow batches --cancel {batch_id}`")
            if batch_id is None:  # killed between upload and create: adopt the batch if it was created
                found = self.api.find_by_input(row["input_file_id"])
                batch_id = found.id if found is not None else self._create(row["input_file_id"])
                queries.set_batch_state(self.wh, row["input_file_id"], batch_id,
                                        found.status if found is not None else "validating", None, None)
            self._wait(row["input_file_id"], batch_id)
        self.on_status("")

    def _create(self, input_file_id: str) -> str:
        batch = self.api.create(input_file_id, metadata={"instructflow_stage": self.stage})
        queries.set_batch_state(self.wh, input_file_id, batch.id, batch.status, None, None)
        logger.info("created batch %s from %s", batch.id, input_file_id)
        return batch.id

    def _wait(self, input_file_id: str, batch_id: str) -> None:
        started = time.monotonic()
        while True:
            batch = self.api.retrieve(batch_id)
            counts = batch.request_counts
            done, failed, total = (counts.completed, counts.failed, counts.total) if counts else (0, 0, 0)
            queries.set_batch_state(self.wh, input_file_id, batch_id, batch.status, done, failed)
            self.on_status(f"batch {batch_id} {batch.status}: {done}/{total} done, {failed} failed, "
                           f"{time.monotonic() - started:.0f}s")
            if batch.status in TERMINAL:
                break
            time.sleep(self.poll_s)
        self._collect(input_file_id, batch)

    def _collect(self, input_file_id: str, batch) -> None:
        output = self.api.content(batch.output_file_id) if batch.output_file_id else ""
        errors = self.api.content(batch.error_file_id) if batch.error_file_id else ""
        batch_error = "; ".join(f"{e.code}: {e.message}" for e in batch.errors.data) \
            if batch.errors is not None and batch.errors.data else None
        lines = line_outcomes(queries.batch_request_keys(self.wh, input_file_id), output, errors, batch_error,
                              batch.status)
        queries.store_batch_lines(self.wh, input_file_id, batch.status, batch.output_file_id, batch.error_file_id,
                                  batch_error, lines)
        missing = sum(1 for *_, m in lines if m)
        logger.info("batch %s %s: %d lines, %d not run", batch.id, batch.status, len(lines), missing)
        if batch.status == "failed":
            raise BatchFailed(f"batch {batch.id} at {self.settings.endpoint} failed: "
                              f"{batch_error or 'no reason given'} (a rerun resubmits its keys)")

    def check_sendable(self, keys: list[str], states: Mapping[str, Mapping], attempts: int, what: str) -> None:
        """Refuse keys that an open batch holds or whose answer is not stored yet (the plan never asks
        for these, since open batches are finished first: a bug, not a reason to pay twice), and keys
        that `attempts` batches already ended without running."""
        free, held = keys_free_for_batch(keys, states)
        if held:
            raise RuntimeError(f"{what} (batch): keys {held[:3]} are held by a batch; refusing to send them again")
        used_up = [k for k in free if k in states and states[k]["missing"] and states[k]["batches"] >= attempts]
        if used_up:
            raise BatchFailed(f"{what}: {len(used_up)} request keys (e.g. {used_up[0]}) were in {attempts} batches "
                              f"that ended without running them (last: {states[used_up[0]]['error']}); "
                              f"see `instructflow batches`")


def cancel_batch(wh: Warehouse, batch_id: str, model: str, api_key: str) -> str:
    """`instructflow batches --cancel ID`: cancel one stored batch at the endpoint it was sent to; returns
    its new status. What it finished is still collected by the next run of its stage."""
    row = queries.batch_by_id(wh, batch_id)
    if row is None:
        raise BatchAPIError(f"no batch {batch_id!r} in this warehouse (`instructflow batches` lists them)")
    # stored masked: the configured endpoint's own URL when it is the same one (`batches` loads the config)
    api = BatchAPI(TeacherSettings(base_url=real_endpoint(row["endpoint"]), model=model or "batch", api_key=api_key))
    try:
        batch = api.cancel(batch_id)
    finally:
        api.close()
    queries.mark_batch_cancelling(wh, batch_id, batch.status)
    return batch.status
