"""The teacher client against a real `transformers serve` hosting a tiny random Llama.

Faults a real server cannot produce on demand (429, 5xx, hung or reset connections) come from
tests/fault_proxy.py, a loopback proxy in front of that same server; everything else is real.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import socket
import sys
import time
from email.utils import formatdate
from pathlib import Path

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

from instructflow.models.bundled import ensure_bundled_hf_dir
from instructflow.models.teacher_server import TeacherServer
from instructflow.models.tiny import build_tiny_llama
from instructflow.tasks.teacher import (TeacherClient, TeacherRequest, TeacherResult, TeacherSettings, backoff_delay,
                                        cost_usd, parse_retry_after, prompt_hash)

sys.path.insert(0, str(Path(__file__).parent))
from fault_proxy import FaultProxy, parse_action  # noqa: E402

SECRET = "sk-test-SECRET123"
FAST_BACKOFF = dict(backoff_base_s=0.01, backoff_max_s=0.05)
PARAMS = {"max_tokens": 8, "temperature": 0.7}


def shared_cache_root() -> Path:
    return Path(os.environ.get("INSTRUCTFLOW_CACHE") or Path.home() / ".cache" / "instructflow")


@pytest.fixture(scope="module")
def server():
    root = shared_cache_root()
    tiny = build_tiny_llama(root / "tiny-llama", tokenizer_dir=ensure_bundled_hf_dir(root))
    with TeacherServer(tiny) as running:
        # one request first: the first generation is slower, and the fault tests use short timeouts
        TeacherClient(TeacherSettings(base_url=running.base_url, model=running.model_name)).run_all(
            [TeacherRequest("warmup", "hi", {"max_tokens": 2})])
        yield running


def upstream(server: TeacherServer) -> str:
    return f"http://{server.host}:{server.port}"


def make_settings(server: TeacherServer, base_url: str | None = None, **overrides) -> TeacherSettings:
    return TeacherSettings(base_url=base_url or server.base_url, model=server.model_name, **overrides)


def requests(n: int, params: dict | None = None) -> list[TeacherRequest]:
    return [TeacherRequest(key=f"r{i}", prompt=f"Write one sentence about the number {i}.", params=params or PARAMS)
            for i in range(n)]


# ---- round trips ---------------------------------------------------------------------------------

def check_ok(result: TeacherResult, request: TeacherRequest, model: str) -> None:
    assert result.ok and result.error is None, result.error
    assert result.key == request.key and result.attempts == 1
    assert isinstance(result.text, str) and len(result.texts) == 1
    assert result.finish_reason in ("stop", "length")
    assert result.prompt_tokens > 0 and 1 <= result.completion_tokens <= request.params["max_tokens"]
    assert result.latency_s > 0
    assert result.params == dict(request.params)
    assert result.prompt_hash == prompt_hash(model, request.prompt, request.params)


@pytest.mark.slow
def test_chat_round_trip_with_accounting(server):
    prices = {server.model_name: (1.0, 2.0)}
    client = TeacherClient(make_settings(server, prices=prices))
    batch = requests(3)
    results = client.run_all(batch)
    assert [r.key for r in results] == ["r0", "r1", "r2"]  # input order
    for result, request in zip(results, batch):
        check_ok(result, request, server.model_name)
        assert result.price_known
        assert result.cost_usd > 0   # priced from the table (its arithmetic: test_cost_from_price_table)
    assert all(r.attempts == 1 and r.prompt_tokens > 0 and r.completion_tokens > 0 for r in results)
    # the system prompt is really sent: a longer one costs more prompt tokens (SmolLM2's template
    # inserts its own default system prompt when none is given, so compare two of ours)
    short, long = ("Be terse.", "Be terse. " * 30)
    short_r, long_r = (TeacherClient(make_settings(server, system_prompt=system)).run_all(batch[:1])[0]
                       for system in (short, long))
    assert short_r.ok and long_r.ok and long_r.prompt_tokens >= short_r.prompt_tokens + 60


@pytest.mark.slow
def test_completions_round_trip(server):
    client = TeacherClient(make_settings(server, api="completions"))
    batch = requests(2, {"max_tokens": 8, "temperature": 0.7, "stop": ["\n\n"], "seed": 3})
    results = client.run_all(batch)
    for result, request in zip(results, batch):
        check_ok(result, request, server.model_name)
    chat = TeacherClient(make_settings(server)).run_all(batch[:1])[0]
    assert results[0].prompt_tokens < chat.prompt_tokens  # raw prompt, no chat template around it
    assert not any(r.price_known for r in results) and all(r.cost_usd == 0 for r in results)


@pytest.mark.slow
def test_run_all_twice_and_async_reuse(server):
    """run_all makes its own event loop each time; the client must not keep a pool from a closed loop."""
    client = TeacherClient(make_settings(server))
    assert all(r.ok for r in client.run_all(requests(1)))
    assert all(r.ok for r in client.run_all(requests(1)))

    async def go() -> list[TeacherResult]:
        try:
            return [await client.complete(requests(1)[0]), *await client.complete_all(requests(2))]
        finally:
            await client.aclose()

    again = asyncio.run(go())
    assert len(again) == 3 and all(r.ok for r in again)


@pytest.mark.slow
def test_n_above_one_is_ignored_by_transformers_serve(server, caplog):
    """Observed behaviour we rely on callers knowing: the server drops `n` and answers one choice; we warn."""
    caplog.set_level(logging.WARNING, logger="instructflow.tasks.teacher")
    result = TeacherClient(make_settings(server)).run_all(requests(1, {"max_tokens": 4, "n": 2}))[0]
    assert result.ok and len(result.texts) == 1
    assert "1 choice(s) for n=2" in caplog.text


@pytest.mark.slow
def test_endpoint_rejections_fail_at_once_with_the_servers_reason(server):
    wrong_model = TeacherClient(TeacherSettings(base_url=server.base_url, model="not-the-served-model",
                                                **FAST_BACKOFF)).run_all(requests(1))[0]
    assert wrong_model.attempts == 1 and wrong_model.error.startswith("HTTP 400: ")
    assert "not-the-served-model" in wrong_model.error  # the server's message, not just the code
    unknown_field = TeacherClient(make_settings(server, **FAST_BACKOFF)).run_all(
        requests(1, {"max_tokens": 4, "top_k": 5}))[0]  # sent as given (extra_body); this server rejects it
    assert unknown_field.attempts == 1 and unknown_field.error.startswith("HTTP 422: ") and "top_k" in unknown_field.error


# ---- faults ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_transient_faults_are_retried_and_counted(server):
    schedule = ["429", "500", "503", "timeout", "reset"]
    retried: list[tuple[str, int, str]] = []
    finished: list[str] = []
    with FaultProxy(upstream(server), schedule, hold_s=5) as proxy:
        client = TeacherClient(make_settings(server, proxy.base_url, max_concurrency=2, max_retries=5, timeout_s=2.0,
                                             **FAST_BACKOFF), rng=random.Random(0))
        results = client.run_all(requests(4), on_result=lambda r: finished.append(r.key),
                                 on_retry=lambda req, attempt, error: retried.append((req.key, attempt, error)))
    assert all(r.ok for r in results), [r.error for r in results]
    assert sorted(finished) == ["r0", "r1", "r2", "r3"]
    injected = len(schedule)
    assert proxy.counts == {"429": 1, "500": 1, "503": 1, "timeout": 1, "reset": 1, "pass": 4}
    assert sum(r.attempts for r in results) == proxy.requests == 4 + injected
    assert sum(r.attempts - 1 for r in results) == len(retried) == injected
    errors = " | ".join(error for _, _, error in retried)
    for expected in ("HTTP 429", "HTTP 500", "HTTP 503", "timeout after 2s", "connection error"):
        assert expected in errors
    for key, attempt, _ in retried:  # attempt numbers are per request and count up from 1
        assert attempt <= next(r.attempts for r in results if r.key == key) - 1


@pytest.mark.slow
def test_request_over_the_retry_cap_is_returned_with_its_error(server):
    seen: list[TeacherResult] = []
    with FaultProxy(upstream(server), ["503", "500", "502", "pass"]) as proxy:
        client = TeacherClient(make_settings(server, proxy.base_url, max_retries=2, **FAST_BACKOFF))
        [result] = client.run_all(requests(1), on_result=seen.append)
    assert proxy.requests == 3 and proxy.counts["pass"] == 0  # gave up: the 4th action was never reached
    assert not result.ok and result.attempts == 3 and seen == [result]
    assert result.error.startswith("HTTP 502: injected fault 502") and "gave up after 3 attempts" in result.error
    assert result.texts == [] and result.text is None and result.prompt_tokens == result.completion_tokens == 0


@pytest.mark.slow
def test_non_retryable_statuses_fail_at_once(server):
    statuses = ["400", "401", "403", "404", "422"]
    with FaultProxy(upstream(server), statuses) as proxy:
        client = TeacherClient(make_settings(server, proxy.base_url, max_concurrency=1, **FAST_BACKOFF))
        results = client.run_all(requests(5))
    assert proxy.requests == 5 and not any(r.ok for r in results)
    assert sorted(r.error.split(":")[0] for r in results) == [f"HTTP {s}" for s in statuses]
    assert all(r.attempts == 1 for r in results)
    # wrong key, no access, wrong URL: no other request can succeed, so the result says stop
    assert sorted(r.error.split(":")[0] for r in results if r.fatal) == ["HTTP 401", "HTTP 403", "HTTP 404"]


@pytest.mark.slow
def test_a_burst_of_429s_halves_the_in_flight_limit_and_successes_raise_it_again(server):
    seen: list[float] = []
    with FaultProxy(upstream(server), ["429"] * 4) as proxy:
        client = TeacherClient(make_settings(server, proxy.base_url, max_concurrency=4, **FAST_BACKOFF))
        results = client.run_all(requests(16, {"max_tokens": 2}), on_result=lambda r: seen.append(client.limit))
    assert all(r.ok for r in results) and client.throttled == 4 == proxy.counts["429"]
    assert min(seen) < 3                        # halved once for the burst (4 -> 2, then +1/limit a success)
    assert seen[-1] > min(seen)                 # additive increase as requests succeed
    assert client.limit <= 4


@pytest.mark.slow
def test_retry_after_of_a_429_holds_the_other_sends_too(server):
    with FaultProxy(upstream(server), ["429;retry-after=0.6"]) as proxy:
        client = TeacherClient(make_settings(server, proxy.base_url, max_concurrency=1, backoff_base_s=0.001,
                                             backoff_max_s=5))
        results = client.run_all(requests(2, {"max_tokens": 2}))
    assert all(r.ok for r in results) and [e.action for e in proxy.events] == ["429", "pass", "pass"]
    assert arrival_gap(proxy) >= 0.55            # the other request waited out the pause as well


@pytest.mark.slow
def test_request_budget_paces_the_sends(server):
    with FaultProxy(upstream(server)) as proxy:
        client = TeacherClient(make_settings(server, proxy.base_url, max_concurrency=8, max_requests_per_minute=240))
        results = client.run_all(requests(8, {"max_tokens": 2}))
    assert all(r.ok for r in results)
    arrivals = [e.at for e in proxy.events]
    # 4 requests/s with a one-second bucket: the first 4 at once, then one every 0.25 s
    assert arrivals[-1] - arrivals[0] >= 0.9


def test_unreachable_endpoint_is_retried_then_reported():
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = TeacherClient(TeacherSettings(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=2,
                                           timeout_s=2, **FAST_BACKOFF))
    [result] = client.run_all(requests(1))
    assert result.attempts == 3 and result.error.startswith("connection error")
    assert "gave up after 3 attempts" in result.error and not result.ok


def arrival_gap(proxy: FaultProxy) -> float:
    first, second = proxy.events[:2]
    return second.at - first.at


@pytest.mark.slow
def test_retry_after_is_honoured_and_capped(server):
    with FaultProxy(upstream(server), ["429;retry-after=0.6"]) as proxy:
        client = TeacherClient(make_settings(server, proxy.base_url, backoff_base_s=0.001, backoff_max_s=5))
        [result] = client.run_all(requests(1))
    assert result.ok and result.attempts == 2
    assert 0.6 <= arrival_gap(proxy) < 2.0  # without the header the jitter would be <= 1 ms

    with FaultProxy(upstream(server), ["503;retry-after=30"]) as proxy:  # a header asking for too much
        client = TeacherClient(make_settings(server, proxy.base_url, backoff_base_s=0.001, backoff_max_s=0.2))
        [result] = client.run_all(requests(1))
    assert result.ok and result.attempts == 2
    assert 0.2 <= arrival_gap(proxy) < 1.5


@pytest.mark.slow
def test_on_result_fires_as_each_request_finishes(server):
    """A fast request is handed over while a slow one (timing out) is still pending."""
    handed_over: list[float] = []
    with FaultProxy(upstream(server), ["timeout"], hold_s=5) as proxy:
        client = TeacherClient(make_settings(server, proxy.base_url, max_concurrency=2, timeout_s=1.5,
                                             **FAST_BACKOFF))
        results = client.run_all(requests(2), on_result=lambda r: handed_over.append(time.monotonic()))
        done = time.monotonic()
    assert all(r.ok for r in results) and sorted(r.attempts for r in results) == [1, 2]
    assert len(handed_over) == 2 and done - handed_over[0] > 1.0


@pytest.mark.parametrize("max_concurrency", [1, 3])
@pytest.mark.slow
def test_never_more_than_max_concurrency_in_flight(server, max_concurrency):
    with FaultProxy(upstream(server)) as proxy:
        client = TeacherClient(make_settings(server, proxy.base_url, max_concurrency=max_concurrency))
        results = client.run_all(requests(9, {"max_tokens": 4}))
    assert all(r.ok for r in results) and proxy.requests == 9
    assert proxy.max_in_flight == max_concurrency  # reached, never exceeded


@pytest.mark.slow
def test_callback_exception_propagates_unwrapped(server):
    def store(result: TeacherResult) -> None:
        raise RuntimeError("warehouse write failed")

    with pytest.raises(RuntimeError, match="warehouse write failed"):
        TeacherClient(make_settings(server)).run_all(requests(2), on_result=store)


# ---- secrets -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_api_key_never_leaks(server, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, including openai's and the HTTP stack's
    settings = make_settings(server, api_key=SECRET, max_retries=1, **FAST_BACKOFF)
    retry_errors: list[str] = []
    with FaultProxy(upstream(server), ["401;echo-auth", "500;echo-auth", "pass"]) as proxy:
        client = TeacherClient(dataclasses.replace(settings, base_url=proxy.base_url, max_concurrency=1))
        results = client.run_all(requests(2), on_retry=lambda req, attempt, error: retry_errors.append(error))
    assert proxy.counts == {"401": 1, "500": 1, "pass": 1}
    failed = next(r for r in results if not r.ok)
    assert "Bearer ***" in failed.error  # the server echoed the key back, and we redacted it
    assert any("Bearer ***" in e for e in retry_errors)
    texts = [repr(settings), str(settings), repr(client), caplog.text, *retry_errors]
    for result in results:
        texts += [repr(result), str(dataclasses.asdict(result))]
    for record in caplog.records:
        texts += [record.getMessage(), repr(record.args), str(record.__dict__)]
    leaks = [t for t in texts if SECRET in t or "SECRET123" in t]
    assert not leaks, leaks[0][:300]
    assert settings.api_key == SECRET  # the key itself is still there to be used


# ---- pure pieces -------------------------------------------------------------------------------------

def test_backoff_schedule_is_full_jitter_exponential():
    delays = [backoff_delay(n, 0.5, 30.0, random.Random(7)) for n in range(1, 9)]
    assert delays == [backoff_delay(n, 0.5, 30.0, random.Random(7)) for n in range(1, 9)]  # seeded: reproducible
    # the same uniform draw scaled by the ceiling 0.5 * 2**(n-1), capped at 30
    draw = random.Random(7).random()
    ceilings = [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert delays == pytest.approx([draw * c for c in ceilings])
    assert backoff_delay(3, 0.5, 30.0, random.Random(7), retry_after_s=4.0) == 4.0  # the server's word wins
    assert backoff_delay(3, 0.5, 30.0, random.Random(7), retry_after_s=120.0) == 30.0  # ... capped
    assert backoff_delay(3, 0.5, 30.0, random.Random(7), retry_after_s=-1.0) == 0.0
    with pytest.raises(ValueError, match="retry must be >= 1"):
        backoff_delay(0, 0.5, 30.0, random.Random(7))


@hypothesis_settings(max_examples=200, deadline=None)
@given(retry=st.integers(1, 10_000), base=st.floats(0, 10), extra=st.floats(0, 100), seed=st.integers(0, 2**32))
def test_backoff_stays_within_its_ceiling(retry, base, extra, seed):
    delay = backoff_delay(retry, base, base + extra, random.Random(seed))
    assert 0 <= delay <= min(base + extra, base * 2.0 ** min(retry - 1, 62))


def test_parse_retry_after():
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": formatdate(1_000_010, usegmt=True)}, now=1_000_000) == 10
    assert parse_retry_after({"retry-after": formatdate(999_000, usegmt=True)}, now=1_000_000) == 0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None and parse_retry_after(None) is None


def test_prompt_hash_is_canonical():
    params = {"temperature": 0.7, "max_tokens": 8, "stop": ["\n\n"]}
    # sha256 of {"model":"m","params":{"max_tokens":8,"stop":["\n\n"],"temperature":0.7},"prompt":"Write a haiku."}
    assert prompt_hash("m", "Write a haiku.", params) == "552b7f6407bc4f113eb9ff279746ca1a764af66fdc3730a26e05366af4008953"
    assert prompt_hash("m", "Write a haiku.", dict(reversed(params.items()))) == prompt_hash("m", "Write a haiku.", params)
    variants = {prompt_hash("m2", "Write a haiku.", params), prompt_hash("m", "Write a poem.", params),
                prompt_hash("m", "Write a haiku.", {**params, "temperature": 0.8}), prompt_hash("m", "Write a haiku.", params)}
    assert len(variants) == 4


def test_cost_from_price_table():
    prices = {"gpt-4o-mini": (0.15, 0.6)}
    assert cost_usd(prices, "gpt-4o-mini", 1_000_000, 500_000) == (pytest.approx(0.45), True)
    assert cost_usd(prices, "other", 1_000_000, 1_000_000) == (0.0, False)


@pytest.mark.parametrize("overrides, field_name", [
    ({"api": "responses"}, "api"), ({"max_concurrency": 0}, "max_concurrency"), ({"max_retries": -1}, "max_retries"),
    ({"timeout_s": 0}, "timeout_s"), ({"base_url": "localhost:8000"}, "base_url"), ({"model": ""}, "model"),
    ({"prices": {"m": (1.0,)}}, "prices['m']"), ({"prices": {"m": (1.0, -2.0)}}, "prices['m']"),
])
def test_bad_settings_name_the_field(overrides, field_name):
    with pytest.raises(ValueError) as info:
        TeacherSettings(**{"base_url": "http://127.0.0.1:1/v1", "model": "m", **overrides})
    message = str(info.value)
    assert message.startswith(f"TeacherSettings.{field_name} must be") and "\n" not in message


def test_request_params_the_client_owns_are_refused():
    with pytest.raises(ValueError, match=r"TeacherRequest 'k': params must not set \['model', 'stream'\]"):
        TeacherRequest("k", "p", {"stream": True, "model": "x", "temperature": 1})


def test_fault_actions_are_validated():
    assert parse_action("429;retry-after=0.5").retry_after == "0.5"
    assert parse_action("401;echo-auth").echo_auth
    for bad in ("teapot", "200", "429;retry-after", "timeout;retry-after=1", "500;bogus"):
        with pytest.raises(ValueError, match="fault action"):
            parse_action(bad)


def test_stop_string_is_cut_like_openai_does():
    from instructflow.tasks.teacher import apply_stop

    assert apply_stop("1. Do x\n\n", ["\n\n", "\n16"], "stop") == ("1. Do x", "stop")
    assert apply_stop("1. Do x16.", ["16.", "16 ."], "stop") == ("1. Do x", "stop")
    # a server that ignores `stop` (continuous batching) runs on to max_tokens: cut at the first one
    assert apply_stop("1. Do x\n\n2. Do y\n16. Z", ["\n16", "\n\n"], "length") == ("1. Do x", "stop")
    assert apply_stop("1. Do x and y", ["\n\n"], "length") == ("1. Do x and y", "length")  # really cut by length
    assert apply_stop("abc", None, "stop") == ("abc", "stop")
