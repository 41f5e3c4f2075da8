"""The Batch API (`/v1/files` + `/v1/batches`): half the price of synchronous requests, answered
within 24 h. Pure parts first (batch input lines, which keys may go into a new batch, reading output
and error lines), then `BatchAPI`, the few calls we make through the `openai` client.

A request key is the line's `custom_id`. A key is never put into a second batch while an open batch
holds it or while a finished batch holds an answer for it that is not stored yet; only keys whose
batch ended without running them (expired, cancelled, a failed batch) or whose line failed go again.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

import openai

from instructflow.tasks.teacher import TeacherRequest, TeacherSettings, status_detail

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# OpenAI writes the lines a batch did not run to its error file with these codes: not failures of the
# request, so the key is resubmitted rather than stored as failed.
NOT_RUN_CODES = frozenset({"batch_expired", "batch_cancelled", "batch_failed"})
COMPLETION_WINDOW = "24h"  # the only window the Batch API offers


def batch_price_table(prices: Mapping[str, Any], batch_prices: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """USD per 1M (prompt, completion) tokens in batch mode: `batch_prices`, else half of `prices`."""
    table = {model: (float(p) / 2, float(c) / 2) for model, (p, c) in prices.items()}
    table.update({model: (float(p), float(c)) for model, (p, c) in batch_prices.items()})
    return table


def batch_line(request: TeacherRequest, settings: TeacherSettings) -> dict:
    """One input line: the body a synchronous request would send (every param in the body, which is
    where the openai client puts extra_body too)."""
    params = dict(request.params)
    if settings.api == "chat":
        messages = [{"role": "user", "content": request.prompt}]
        if settings.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": settings.system_prompt})
        body = {"model": settings.model, "messages": messages, **params}
    else:
        body = {"model": settings.model, "prompt": request.prompt, **params}
    return {"custom_id": request.key, "method": "POST", "url": ENDPOINTS[settings.api], "body": body}


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

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class BatchAPI:
    def __init__(self, settings: TeacherSettings):
        self.settings = settings
        # the client's own retries are on here: these are few, idempotent-enough control calls
        self.client = openai.OpenAI(base_url=settings.base_url, api_key=settings.api_key, max_retries=3,
                                    timeout=settings.timeout_s)

    def close(self) -> None:
        self.client.close()

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except openai.APIStatusError as exc:
            raise BatchAPIError(self._redact(f"{what}: HTTP {exc.status_code}: {status_detail(exc)}"),
                                exc.status_code) from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc.__context__
            raise BatchAPIError(self._redact(f"{what}: connection error: {cause or exc.message}")) from None

    def _redact(self, message: str) -> str:
        key = self.settings.api_key
        if key and key != "none":
            message = message.replace(key, "***")
        return " ".join(message.split())[:500]

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
