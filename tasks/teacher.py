"""The teacher client: many prompts to one OpenAI-compatible endpoint, each answered exactly once.

    client = TeacherClient(TeacherSettings(base_url="http://127.0.0.1:8000/v1", model="m"))
    results = await client.complete_all(requests, on_result=store_row)   # same order as `requests`
    await client.aclose()

One code path for every endpoint (OpenAI, vLLM, `transformers serve`, ...): the `openai` package's
AsyncOpenAI with its own retries off, because we retry ourselves, per request, with accounting:
  - at most `max_concurrency` HTTP requests in flight (counted only while a request is on the wire,
    so a request sleeping in backoff does not block the others). A burst of 429s halves that limit
    (at most once per second) and each success raises it by 1/limit, back up to max_concurrency
    (additive increase, multiplicative decrease), so we settle where the endpoint stops throttling;
  - optional budgets, `max_requests_per_minute` and `max_tokens_per_minute` (prompt estimate plus
    max_tokens at send, corrected by the usage the response reports), paced as token buckets;
  - 429, 408, 409, 5xx, timeouts and connection errors are retried with exponential backoff and
    full jitter (a Retry-After header, when sent, replaces the jitter, capped at backoff_max_s, and
    a 429's Retry-After also holds every other send until then);
    400/401/403/404/422 and anything else fail at once; 401/403/404 and an unknown model are also
    `fatal`: no other request can succeed, so the caller should stop (the result says so);
  - after `max_retries` retries the request is returned with its error string: never raised, never
    dropped, never retried forever.
Every result carries its accounting (prompt hash, params, tokens, latency, attempts, cost), and the
API key, like any credential in the base URL, is kept out of every repr, error string, log line and
record (`TeacherSettings.endpoint` is the URL as messages name it; tasks/secrets.py).
"""
from __future__ import annotations

import asyncio
import collections
import email.utils
import hashlib
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import openai
from openai.types import Completion
from openai.types.chat import ChatCompletion

from instructflow.tasks import secrets

logger = logging.getLogger(__name__)

APIS = ("chat", "completions")
RETRYABLE_STATUS = frozenset({408, 409, 429})  # plus every 5xx
FATAL_STATUS = frozenset({401, 403, 404})  # wrong key, no access, wrong URL: every other request fails the same way
UNKNOWN_MODEL = re.compile(r"(?i)\bmodel\b.*\b(not found|does not exist|not exist|unknown|no such|not available)\b"
                           r"|\b(unknown|invalid) model\b")
# Request fields the client sets itself; a caller passing them in params is a bug.
RESERVED_PARAMS = frozenset({"model", "messages", "prompt", "stream", "stream_options", "timeout",
                             "extra_body", "extra_headers", "extra_query"})
MAX_ERROR_CHARS = 500
# each API's path under the base URL (.../v1) and its response type
RESPONSE_TYPES = {"chat": ("/chat/completions", ChatCompletion), "completions": ("/completions", Completion)}


# ---------------------------------------------------------------------------------------------
# Settings, requests, results

@dataclass(frozen=True)
class TeacherSettings:
    base_url: str
    model: str
    api_key: str = field(repr=False, default="none")
    api: str = "chat"  # "chat" | "completions"
    max_concurrency: int = 4
    max_retries: int = 5
    timeout_s: float = 120.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    prices: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # model -> USD per 1M (prompt, completion) tokens
    system_prompt: str | None = None
    max_requests_per_minute: float = 0.0  # 0 = no budget
    max_tokens_per_minute: float = 0.0  # prompt + completion tokens; 0 = no budget

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"TeacherSettings.{name} must be {expected}, got {getattr(self, name)!r}")

        check(isinstance(self.base_url, str) and self.base_url.startswith(("http://", "https://")), "base_url",
              "an http(s) URL")
        check(isinstance(self.model, str) and bool(self.model), "model", "a non-empty model name")
        check(self.api in APIS, "api", "'chat' or 'completions'")
        check(isinstance(self.max_concurrency, int) and self.max_concurrency >= 1, "max_concurrency", "an int >= 1")
        check(isinstance(self.max_retries, int) and self.max_retries >= 0, "max_retries", "an int >= 0")
        check(self.timeout_s > 0, "timeout_s", "> 0")
        check(self.backoff_base_s >= 0, "backoff_base_s", ">= 0")
        check(self.backoff_max_s >= self.backoff_base_s, "backoff_max_s", ">= backoff_base_s")
        check(self.max_requests_per_minute >= 0, "max_requests_per_minute", ">= 0 (0 = no budget)")
        check(self.max_tokens_per_minute >= 0, "max_tokens_per_minute", ">= 0 (0 = no budget)")
        for model, price in self.prices.items():
            if len(price) != 2 or any(not isinstance(p, (int, float)) or p < 0 for p in price):
                raise ValueError(f"TeacherSettings.prices[{model!r}] must be (usd per 1M prompt tokens, "
                                 f"usd per 1M completion tokens), both >= 0, got {price!r}")
        secrets.remember(self.api_key)
        secrets.remember_endpoint(self.base_url)

    @property
    def endpoint(self) -> str:
        """The base URL as messages and records name it: credentials (userinfo, ?api-key=) masked."""
        return secrets.public_url(self.base_url)

    def openai_client_args(self) -> dict:
        """base_url and default_query for an openai client: the client appends paths to the base URL's
        raw text, so a query in it (`/v1?api-key=K`) must travel as default_query instead."""
        parts = urlsplit(self.base_url)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        base = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        return {"base_url": base, "api_key": self.api_key, **({"default_query": query} if query else {})}


@dataclass(frozen=True)
class TeacherRequest:
    key: str  # the caller's id for this request (unique within a run; results come back with it)
    prompt: str
    params: Mapping[str, Any] = field(default_factory=dict)  # temperature, top_p, max_tokens, stop, n, seed, ...

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise TypeError(f"TeacherRequest {self.key!r}: prompt must be a str, got {type(self.prompt).__name__}")
        if not isinstance(self.params, Mapping):
            raise TypeError(f"TeacherRequest {self.key!r}: params must be a mapping, got {type(self.params).__name__}")
        reserved = sorted(RESERVED_PARAMS & set(self.params))
        if reserved:
            raise ValueError(f"TeacherRequest {self.key!r}: params must not set {reserved} (the client sets them)")


@dataclass
class TeacherResult:
    key: str
    prompt_hash: str
    model: str
    params: dict
    texts: list[str]  # one per returned choice ("" for a choice with no content)
    finish_reasons: list[str | None]
    prompt_tokens: int
    completion_tokens: int
    latency_s: float  # duration of the last attempt's HTTP round trip (not queueing or backoff)
    attempts: int  # HTTP requests sent; retries = attempts - 1
    error: str | None  # None when ok; else e.g. "HTTP 503: ... (gave up after 6 attempts)"
    cost_usd: float
    price_known: bool = True  # False: model missing from the price table, cost_usd is 0
    fatal: bool = False  # 401/403/404 or unknown model: the endpoint refuses everything, stop asking

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str | None:
        return self.texts[0] if self.texts else None

    @property
    def finish_reason(self) -> str | None:
        return self.finish_reasons[0] if self.finish_reasons else None


def request_body(settings: TeacherSettings, prompt: str, params: Mapping) -> dict:
    """The JSON body of one request, as a synchronous call and a Batch API line both send it: every
    param in the body (a server-specific one such as top_k too)."""
    if settings.api == "chat":
        messages = [{"role": "user", "content": prompt}]
        if settings.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": settings.system_prompt})
        return {"model": settings.model, "messages": messages, **params}
    return {"model": settings.model, "prompt": prompt, **params}


def redact(message: str, api_key: str) -> str:
    """One line, bounded, and without the API key or any other secret (a server may echo the
    Authorization header; an error may quote the URL): `tasks.secrets.redact`."""
    secrets.remember(api_key)
    message = " ".join(secrets.redact(message).split())
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + "..."


def apply_stop(text: str, stop: Any, finish_reason: str | None) -> tuple[str, str | None]:
    """(text, finish_reason) as OpenAI returns them: cut before the first stop string, which then is
    the reason it finished. Servers differ: transformers serve keeps the stop string at the end, and
    with --continuous-batching it ignores `stop` altogether and runs to max_tokens."""
    markers = [stop] if isinstance(stop, str) else list(stop or [])
    found = [text.find(marker) for marker in markers if marker and marker in text]
    if not found:
        return text, finish_reason
    return text[: min(found)], "stop"


def prompt_hash(model: str, prompt: str, params: Mapping) -> str:
    """sha256 of the canonical JSON of (model, prompt, params): equal for equal requests, key order ignored."""
    canonical = json.dumps({"model": model, "prompt": prompt, "params": dict(params)}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def cost_usd(prices: Mapping[str, tuple[float, float]], model: str, prompt_tokens: int,
             completion_tokens: int) -> tuple[float, bool]:
    """(cost, price_known) for one request; a model missing from the table costs 0 and is flagged."""
    if model not in prices:
        return 0.0, False
    per_prompt, per_completion = prices[model]
    return (prompt_tokens * per_prompt + completion_tokens * per_completion) / 1_000_000, True


# ---------------------------------------------------------------------------------------------
# Backoff

def backoff_delay(retry: int, base_s: float, max_s: float, rng: random.Random,
                  retry_after_s: float | None = None) -> float:
    """Seconds to sleep before retry number `retry` (1 = first retry).

    Full jitter (uniform in [0, min(max_s, base_s * 2**(retry-1))]) spreads clients that failed
    together; a server's Retry-After replaces it, capped at max_s so a hostile header cannot stall us.
    """
    if retry < 1:
        raise ValueError(f"backoff_delay: retry must be >= 1, got {retry}")
    if retry_after_s is not None:
        return min(max(retry_after_s, 0.0), max_s)
    ceiling = min(max_s, base_s * 2 ** min(retry - 1, 62))  # exponent capped: 2**1000 would overflow the float
    return rng.uniform(0.0, ceiling)


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date); None if absent/unreadable."""
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return float(value) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def status_detail(exc: openai.APIStatusError) -> str:
    """The server's own words: OpenAI-style {"error": {"message"}}, FastAPI-style {"detail"}, or the raw body."""
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("detail", "message", "error"):
            if body.get(key):
                return body[key] if isinstance(body[key], str) else json.dumps(body[key], default=str)
    if isinstance(body, str) and body.strip():
        return body
    return exc.message


# ---------------------------------------------------------------------------------------------
# The client

@dataclass
class _Attempt:
    """What one HTTP attempt produced: a parsed response, or an error and whether to retry it."""
    response: Any = None
    error: str | None = None
    retryable: bool = False
    retry_after_s: float | None = None
    fatal: bool = False
    throttled: bool = False  # a 429


class _Bucket:
    """A per-minute budget paced as a token bucket holding at most one second's worth."""

    def __init__(self, per_minute: float):
        self.per_s = per_minute / 60
        self.capacity = max(1.0, self.per_s)
        self.level, self.at = self.capacity, time.monotonic()

    def wait_s(self, cost: float, now: float) -> float:
        """Seconds until `cost` fits (a cost above the capacity waits for a full bucket, then overdraws)."""
        self.level = min(self.capacity, self.level + (now - self.at) * self.per_s)
        self.at = now
        return max(0.0, min(cost, self.capacity) - self.level) / self.per_s


class TeacherClient:
    def __init__(self, settings: TeacherSettings, *, rng: random.Random | None = None):
        self.settings = settings
        self.rng = rng or random.Random()
        # Live flow control, for progress bars and stage metrics.
        self.limit = float(settings.max_concurrency)  # the AIMD in-flight limit
        self.in_flight = 0
        self.throttled = 0  # 429 answers
        self._decrease_at = 0.0
        self._paused_until = 0.0
        self._requests_budget = _Bucket(settings.max_requests_per_minute) if settings.max_requests_per_minute else None
        self._tokens_budget = _Bucket(settings.max_tokens_per_minute) if settings.max_tokens_per_minute else None
        # The openai client (its connection pool) and the waiters belong to one event loop; the client
        # is made on first use in the running loop, so run_all() can be called more than once.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._openai: openai.AsyncOpenAI | None = None
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._warned: set[str] = set()

    def __repr__(self) -> str:  # settings' repr already leaves the key out
        return f"TeacherClient({self.settings!r})"

    def _session(self) -> openai.AsyncOpenAI:
        loop = asyncio.get_running_loop()
        if self._openai is None or self._loop is not loop:
            settings = self.settings
            self._openai = openai.AsyncOpenAI(**settings.openai_client_args(), max_retries=0,
                                              timeout=settings.timeout_s)
            self._loop = loop
            self.in_flight = 0
            self._waiters.clear()
        return self._openai

    async def aclose(self) -> None:
        client, self._openai, self._loop = self._openai, None, None
        if client is not None:
            await client.close()

    # --- flow control: who may go on the wire now -----------------------------------------------
    async def _acquire(self, token_estimate: int) -> None:
        while True:
            now = time.monotonic()
            wait = self._paused_until - now
            if self._requests_budget is not None:
                wait = max(wait, self._requests_budget.wait_s(1, now))
            if self._tokens_budget is not None:
                wait = max(wait, self._tokens_budget.wait_s(token_estimate, now))
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if self.in_flight < max(1, int(self.limit)):
                break
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        self.in_flight += 1
        if self._requests_budget is not None:
            self._requests_budget.level -= 1
        if self._tokens_budget is not None:
            self._tokens_budget.level -= token_estimate

    def _release(self, outcome: "_Attempt", token_estimate: int) -> None:
        self.in_flight -= 1
        now = time.monotonic()
        if outcome.throttled:
            self.throttled += 1
            if now >= self._decrease_at:  # one halving per burst, not one per 429 of the burst
                self.limit = max(1.0, self.limit / 2)
                self._decrease_at = now + 1.0
            if outcome.retry_after_s is not None:
                self._paused_until = max(self._paused_until,
                                         now + min(outcome.retry_after_s, self.settings.backoff_max_s))
        elif outcome.error is None:
            self.limit = min(float(self.settings.max_concurrency), self.limit + 1 / self.limit)
        if self._tokens_budget is not None and outcome.response is not None:
            usage = getattr(outcome.response, "usage", None)
            used = int(getattr(usage, "prompt_tokens", 0) or 0) + int(getattr(usage, "completion_tokens", 0) or 0)
            if used:
                self._tokens_budget.level -= used - token_estimate
        free = max(1, int(self.limit)) - self.in_flight
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled waiter is skipped
                waiter.set_result(None)
                free -= 1

    # --- one request ---------------------------------------------------------------------------
    async def complete(self, request: TeacherRequest,
                       on_retry: Callable[[TeacherRequest, int, str], None] | None = None) -> TeacherResult:
        """Send one request, retrying transient failures; returns a result for API/network errors, never raises."""
        settings = self.settings
        params = dict(request.params)
        attempts, latency = 0, 0.0
        token_estimate = len(request.prompt) // 4 + int(params.get("max_tokens") or 256)
        while True:
            attempts += 1
            client = self._session()
            await self._acquire(token_estimate)
            started = time.monotonic()
            outcome = _Attempt(error="cancelled")
            try:
                outcome = await self._send(client, request.prompt, params)
            finally:
                latency = time.monotonic() - started
                self._release(outcome, token_estimate)
            if outcome.error is None or not outcome.retryable or attempts > settings.max_retries:
                break
            delay = backoff_delay(attempts, settings.backoff_base_s, settings.backoff_max_s, self.rng,
                                  outcome.retry_after_s)
            logger.info("teacher request %s attempt %d failed (%s); retrying in %.2fs",
                        request.key, attempts, outcome.error, delay)
            if on_retry is not None:
                on_retry(request, attempts, outcome.error)
            await asyncio.sleep(delay)

        error = outcome.error
        if error is not None and outcome.retryable:
            error = f"{error} (gave up after {attempts} attempts)"
        result = self.result_from_response(request, params, outcome.response, error, attempts, latency)
        result.fatal = outcome.fatal
        if not result.ok:  # usage is counted once, from the stored results (`queries.teacher_totals`)
            logger.warning("teacher request %s failed: %s", result.key, result.error)
        return result

    async def _send(self, client: openai.AsyncOpenAI, prompt: str, params: dict) -> _Attempt:
        settings = self.settings
        path, cast_to = RESPONSE_TYPES[settings.api]
        try:
            # client.post (the openai client's call for any endpoint) sends the body as built: create() would
            # first walk its ~40 typed parameters (1.96 -> 1.61 ms of stage CPU a request, bench/generate_scale.py)
            response = await client.post(path, cast_to=cast_to, body=request_body(settings, prompt, params))
        except openai.APIStatusError as exc:
            status, detail = exc.status_code, status_detail(exc)
            return _Attempt(error=redact(f"HTTP {status}: {detail}", self.settings.api_key),
                            retryable=status in RETRYABLE_STATUS or status >= 500,
                            retry_after_s=parse_retry_after(exc.response.headers),
                            fatal=status in FATAL_STATUS or (status in (400, 422) and bool(UNKNOWN_MODEL.search(detail))),
                            throttled=status == 429)
        except openai.APITimeoutError:
            return _Attempt(error=f"timeout after {settings.timeout_s:g}s", retryable=True)
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc.__context__
            detail = f"{type(cause).__name__}: {cause}" if cause is not None else exc.message
            return _Attempt(error=redact(f"connection error: {detail}", self.settings.api_key), retryable=True)
        except Exception as exc:  # a malformed response, an unusable param: this request fails, the run goes on
            return _Attempt(error=redact(f"{type(exc).__name__}: {exc}", self.settings.api_key))
        return _Attempt(response=response)

    def result_from_response(self, request: TeacherRequest, params: dict, response: Any, error: str | None, attempts: int,
                latency: float) -> TeacherResult:
        settings = self.settings
        texts: list[str] = []
        finish_reasons: list[str | None] = []
        prompt_tokens = completion_tokens = 0
        if response is not None:
            for choice in response.choices or []:
                text = choice.message.content if settings.api == "chat" else choice.text
                text, finish_reason = apply_stop(text or "", params.get("stop"), choice.finish_reason)
                texts.append(text)
                finish_reasons.append(finish_reason)
            usage = getattr(response, "usage", None)
            prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
            completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
            wanted = int(params.get("n", 1) or 1)
            if len(texts) < wanted:
                self._warn_once(f"n:{len(texts)}", f"teacher returned {len(texts)} choice(s) for n={wanted} "
                                                   f"(the endpoint ignores n; send n separate requests instead)")
            if not texts and error is None:
                error = "response has no choices"
        cost, known = cost_usd(settings.prices, settings.model, prompt_tokens, completion_tokens)
        if not known:
            self._warn_once(f"price:{settings.model}",
                            f"no price for teacher model {settings.model!r}: cost counted as 0")
        return TeacherResult(key=request.key, prompt_hash=prompt_hash(settings.model, request.prompt, params),
                             model=settings.model,
                             params=params, texts=texts, finish_reasons=finish_reasons, prompt_tokens=prompt_tokens,
                             completion_tokens=completion_tokens, latency_s=latency, attempts=attempts, error=error,
                             cost_usd=cost, price_known=known)

    def _warn_once(self, tag: str, message: str) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            logger.warning(message)

    # --- many requests ---------------------------------------------------------------------------
    async def complete_all(self, requests: Iterable[TeacherRequest],
                           on_result: Callable[[TeacherResult], None] | None = None,
                           on_retry: Callable[[TeacherRequest, int, str], None] | None = None) -> list[TeacherResult]:
        """All requests concurrently (bounded by max_concurrency); results in input order.

        `on_result` runs for each result the moment it is done (in the event loop thread), so the
        caller can persist it at once. If a callback raises, the remaining requests are cancelled
        and the exception propagates: a failing store must not be papered over.
        """
        requests = list(requests)
        results: list[TeacherResult | None] = [None] * len(requests)

        async def one(index: int, request: TeacherRequest) -> None:
            result = await self.complete(request, on_retry=on_retry)
            results[index] = result
            if on_result is not None:
                on_result(result)

        try:
            async with asyncio.TaskGroup() as group:
                for index, request in enumerate(requests):
                    group.create_task(one(index, request))
        except BaseExceptionGroup as group_error:  # the caller's own exception, not a group wrapper
            raise group_error.exceptions[0] from None
        return results  # type: ignore[return-value]  # every slot was filled (or the group raised)

    def run_all(self, requests: Iterable[TeacherRequest],
                on_result: Callable[[TeacherResult], None] | None = None,
                on_retry: Callable[[TeacherRequest, int, str], None] | None = None) -> list[TeacherResult]:
        """complete_all() from synchronous code (its own event loop; the connection pool is closed after)."""
        async def go() -> list[TeacherResult]:
            try:
                return await self.complete_all(requests, on_result=on_result, on_retry=on_retry)
            finally:
                await self.aclose()

        return asyncio.run(go())
