"""Batch API mode (issue 15): the generate stage through the real `openai` client against our loopback
Batch API (tests/batch_server.py), whose every line runs on a real `transformers serve` (tiny Llama).
Cases: a full stage with a failed and an expired line; SIGKILL while polling, then a rerun; a bad key."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import duckdb
import pytest

from batch_server import BatchServer, Plan
from cliutil import cli, cli_popen, query, shared_api

KEY = "sk-batch-test-0123456789"


# --- pure parts ---------------------------------------------------------------------------------
def test_batch_prices_are_half_unless_given():
    from instructflow.tasks.batch import batch_price_table

    table = batch_price_table({"a": [2.0, 8.0], "b": [1.0, 1.0]}, {"b": [0.3, 0.4]})
    assert table == {"a": (1.0, 4.0), "b": (0.3, 0.4)}


def test_line_outcomes_answer_failure_not_run_and_absent():
    from instructflow.tasks.batch import line_outcomes

    body = {"choices": [{"message": {"content": "x"}}]}
    output = json.dumps({"custom_id": "k0", "response": {"status_code": 200, "body": body}, "error": None})
    errors = "\n".join([
        json.dumps({"custom_id": "k1", "response": {"status_code": 500, "body": {"error": {"message": "boom"}}},
                    "error": None}),
        json.dumps({"custom_id": "k2", "response": None,
                    "error": {"code": "batch_expired", "message": "not executed before expiry"}})])
    got = {key: rest for key, *rest in line_outcomes(["k0", "k1", "k2", "k3"], output, errors, None, "expired")}
    assert got["k0"] == [body, None, False]
    assert got["k1"] == [None, "HTTP 500: boom", False]                  # a failure: stored, retried by key_attempts
    assert got["k2"][0] is None and "batch_expired" in got["k2"][1] and got["k2"][2]  # not run: resubmitted
    assert got["k3"] == [None, "batch expired before this line ran", True]


def test_keys_held_by_open_or_unstored_batches_are_never_free():
    from instructflow.tasks.batch import keys_free_for_batch

    def state(collected, response, stored):
        return {"collected_at": collected, "response": response, "stored": stored}

    states = {"open": state(None, None, False), "answered": state(1, {"x": 1}, False),
              "stored": state(1, {"x": 1}, True), "missing": state(1, None, False)}
    free, held = keys_free_for_batch(["open", "answered", "stored", "missing", "new"], states)
    assert held == ["open", "answered"] and free == ["stored", "missing", "new"]


def test_batch_mode_with_the_embedded_teacher_is_refused_when_the_config_loads(tmp_path, monkeypatch):
    from instructflow.tasks.config import ConfigError, load_config

    path = tmp_path / "c.toml"
    path.write_text("[profiles.t]\ninherits = 'tiny'\n[profiles.t.teacher]\nmode = 'batch'\n")
    with pytest.raises(ConfigError) as refused:
        load_config("t", path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "profiles.t.teacher.mode must be 'sync'" in message
    monkeypatch.setenv("INSTRUCTFLOW_TEACHER_ENDPOINT", "http://127.0.0.1:9/v1")
    assert load_config("t", path).teacher.mode == "batch"       # a real endpoint: fine


# --- the stage, end to end ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher():
    from instructflow.flows.common import cache_dir
    from instructflow.models.bundled import ensure_bundled_hf_dir
    from instructflow.models.teacher_server import TeacherServer
    from instructflow.models.tiny import build_tiny_llama

    tiny = build_tiny_llama(cache_dir() / "tiny-llama", tokenizer_dir=ensure_bundled_hf_dir(cache_dir()))
    with TeacherServer(tiny) as running:
        yield running


@pytest.fixture
def api(teacher, prefect_api):  # the stage commands below run against the session's Prefect API (shared_api)
    with BatchServer(f"http://{teacher.host}:{teacher.port}", api_key=KEY) as running:
        yield running


def batch_config(tmp_path: Path, api: BatchServer, teacher, generate: str) -> Path:
    path = tmp_path / "batch.toml"
    path.write_text(f"""[profiles.t]
inherits = 'tiny'
[profiles.t.teacher]
endpoint = "{api.base_url}"
model = "{teacher.model_name}"
mode = "batch"
batch_poll_s = 0.2
prices = {{"{teacher.model_name}" = [2.0, 4.0]}}
[profiles.t.generate]
target_kept = 1000
max_tokens = 16
instance_max_tokens = 12
{generate}""")
    return path


def generate(config: Path, home: Path, key: str = KEY):
    return cli("stage", "generate", "--profile", "t", "--config", str(config), home=home, OPENAI_API_KEY=key,
               **shared_api())


def assert_never_paid_twice(api: BatchServer) -> None:
    """No key goes into a batch after a batch answered it."""
    answered_by: dict[str, str] = {}
    for batch_id in api.created:
        for key in api.keys[batch_id]:
            assert key not in answered_by, f"{key} answered by {answered_by.get(key)}, sent again in {batch_id}"
        answered_by.update(dict.fromkeys(api.answered[batch_id], batch_id))


def kill_while_polling(api: BatchServer, stage: str, config: Path, home: Path, deadline_s: float, **env) -> str:
    """Run `instructflow stage STAGE` with its first batch held open; SIGKILL it once it polled that
    batch twice. Returns the batch id."""
    api.hold()
    api.plans.append(Plan(hold=True))
    run = cli_popen("stage", stage, "--profile", "t", "--config", str(config), home=home, OPENAI_API_KEY=KEY, **env)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and run.poll() is None and \
            not (api.created and sum(1 for _, b in api.retrieves if b == api.created[0]) >= 2):
        time.sleep(0.1)
    assert run.poll() is None, f"run ended before it could be killed: {run.stderr.read()[-2000:]}"
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    return api.created[0]


@pytest.mark.slow
def test_batch_generate_stage_end_to_end_with_failed_and_expired_lines(tmp_path, teacher, api):
    home = tmp_path / "home"
    config = batch_config(tmp_path, api, teacher, "max_requests = 3\nbatch_size = 3\ninstances = false\n")
    api.plans.append(Plan(fail_lines={1}, expire_after=2))   # line 0 answered, 1 fails, 2 never runs
    out = generate(config, home)
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = api.created
    keys = [f"instructions:{i:06d}" for i in range(3)]
    assert api.keys[first] == keys and api.keys[second] == keys[1:]      # only the failed and the unrun key again
    assert [k for (k,) in query(home, "SELECT request_key FROM teacher_requests WHERE error IS NULL ORDER BY 1")] \
        == keys
    # every failure recorded with its error: the failed line as request history, the unrun one per batch
    assert query(home, "SELECT request_key, error FROM teacher_request_history") == \
        [("instructions:000001", "HTTP 500: simulated server error")]
    lines = {k: (e, m) for k, e, m in query(
        home, "SELECT r.request_key, r.error, r.missing FROM teacher_batch_requests r JOIN teacher_batches b "
              "USING (input_file_id) WHERE b.batch_id = ?", [first])}
    assert lines["instructions:000000"] == (None, False) and lines["instructions:000001"][1] is False
    assert "batch_expired" in lines["instructions:000002"][0] and lines["instructions:000002"][1] is True
    assert [s for (s,) in query(home, "SELECT status FROM teacher_batches ORDER BY created_at")] == \
        ["expired", "completed"]
    # stored like a synchronous result: texts, usage, and the cost at half of `prices`
    rows = query(home, "SELECT prompt_tokens, completion_tokens, cost_usd, texts FROM teacher_requests")
    assert all(pt > 0 and ct > 0 and json.loads(texts) for pt, ct, _, texts in rows)
    assert all(cost == pytest.approx((pt * 1.0 + ct * 2.0) / 1e6) for pt, ct, cost, _ in rows)
    assert query(home, "SELECT count(*) FROM candidates WHERE verdict IS NULL")[0][0] == 0

    # The tiny random teacher's replies rarely pass the filters, so the instance step is reached by
    # keeping two stored candidates; the rerun sends the classify batch, then the instances batch.
    con = duckdb.connect(str(home / "warehouse.duckdb"))
    con.execute("UPDATE candidates SET verdict = 'kept', reason = NULL, heuristic_reason = NULL WHERE candidate_id "
                "IN (SELECT candidate_id FROM candidates ORDER BY 1 LIMIT 2)")
    kept = [r[0] for r in con.execute("SELECT candidate_id FROM candidates WHERE verdict = 'kept' ORDER BY 1").fetchall()]
    con.close()
    config.write_text(config.read_text().replace("instances = false\n", ""))
    out = generate(config, home)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [set(api.keys[b]) for b in api.created[2:]] == [{f"classify:{c}" for c in kept},
                                                           {f"instances:{c}" for c in kept}]
    assert query(home, "SELECT count(*) FROM candidates WHERE is_classification IS NOT NULL")[0][0] == len(kept)
    assert query(home, "SELECT count(*), count(error) FROM teacher_requests WHERE purpose <> 'instructions'")[0] \
        == (2 * len(kept), 0)
    assert_never_paid_twice(api)
    assert query(home, "SELECT batch_id, status FROM teacher_batches WHERE collected_at IS NOT NULL "
                       "ORDER BY created_at") == list(zip(api.created, ["expired"] + ["completed"] * 3))
    assert KEY.encode() not in (home / "warehouse.duckdb").read_bytes()
    assert not any(KEY in p.read_text(errors="replace") for p in (home / "logs").rglob("*") if p.is_file())


@pytest.mark.slow
def test_sigkill_while_polling_then_rerun_polls_the_same_batch(tmp_path, teacher, api):
    home = tmp_path / "home"
    config = batch_config(tmp_path, api, teacher, "max_requests = 2\nbatch_size = 1\ninstances = false\n")
    first = kill_while_polling(api, "generate", config, home, deadline_s=180, **shared_api())
    assert query(home, "SELECT batch_id, collected_at FROM teacher_batches") == [(first, None)]
    status = json.loads(cli("status", "--json", "--profile", "t", "--config", str(config), home=home).stdout)
    assert status["open_batches"] == [first]
    killed_at = time.time()
    api.release()

    out = generate(config, home)
    assert out.returncode == 0, out.stderr[-3000:]
    assert any(b == first and t > killed_at for t, b in api.retrieves)      # the rerun polled the same batch
    assert len(api.created) == 2 and api.keys[api.created[1]] == ["instructions:000001"]  # no second batch for its key
    assert_never_paid_twice(api)
    assert [k for (k,) in query(home, "SELECT request_key FROM teacher_requests ORDER BY 1")] == \
        ["instructions:000000", "instructions:000001"]
    assert query(home, "SELECT count(*) FROM candidates c WHERE NOT EXISTS "
                       "(SELECT 1 FROM teacher_requests r WHERE r.request_key = c.request_key)")[0][0] == 0
    assert query(home, "SELECT count(*) FROM (SELECT request_key, position FROM candidates "
                       "GROUP BY ALL HAVING count(*) > 1)")[0][0] == 0   # no duplicate rows
    runs = query(home, "SELECT status FROM stage_runs WHERE stage = 'generate' ORDER BY started_at")
    assert [r[0] for r in runs] == ["failed", "success"]


@pytest.mark.slow
def test_bad_key_is_one_line_and_creates_nothing(tmp_path):
    """In-process (the CLI's exit code 1 for a stage's one-line failure is covered by the sync 401 test)."""
    import asyncio

    from instructflow.tasks.batch_generate import BatchGenerator
    from instructflow.tasks.config import load_config
    from instructflow.tasks.generate import GenerateFailed
    from instructflow.tasks.teacher import TeacherClient, TeacherSettings
    from instructflow.warehouse.store import open_warehouse

    from instructflow.flows.common import seed_paths
    from instructflow.tasks.seeds import load_seeds
    from instructflow.warehouse import queries

    cfg = load_config("tiny")
    cfg = cfg.replace(teacher={"mode": "batch", "endpoint": "http://127.0.0.1:9/v1"})
    (tmp_path / "home").mkdir()
    wh = open_warehouse(tmp_path / "home")
    queries.replace_seed_tasks(wh, load_seeds(seed_paths(cfg), max_chars=cfg.generate.max_seed_chars))
    with BatchServer("http://127.0.0.1:9", api_key=KEY) as api:
        settings = TeacherSettings(base_url=api.base_url, model="m", api_key="sk-wrong-key-987654")
        with pytest.raises(GenerateFailed) as failed:
            asyncio.run(BatchGenerator(wh, cfg, TeacherClient(settings)).run())
        assert api.created == [] and api.refused == 1                   # stopped at the first call, the upload
    message = str(failed.value)
    assert "\n" not in message and "401" in message and "Incorrect API key" in message
    assert api.base_url in message and "OPENAI_API_KEY" in message and "sk-wrong-key-987654" not in message
    assert wh.scalar("SELECT count(*) FROM teacher_batches") == 0
    wh.close()


@pytest.mark.slow
def test_batches_lists_and_cancels_an_open_batch(tmp_path):
    """`instructflow batches --cancel ID` cancels at the endpoint and marks it; no teacher needed (the
    held batch never runs a line)."""
    from instructflow.tasks.batch import BatchAPI, batch_line, encode_jsonl
    from instructflow.tasks.teacher import TeacherRequest, TeacherSettings
    from instructflow.warehouse import queries
    from instructflow.warehouse.store import open_warehouse

    home = tmp_path / "home"
    home.mkdir()
    with BatchServer("http://127.0.0.1:9", api_key=KEY) as api:
        api.hold()
        api.plans.append(Plan(hold=True))
        settings = TeacherSettings(base_url=api.base_url, model="m", api_key=KEY)
        client = BatchAPI(settings)
        request = TeacherRequest(key="instructions:000000", prompt="p", params={"max_tokens": 4})
        file_id = client.upload(encode_jsonl([batch_line(request, settings)]))
        wh = open_warehouse(home)
        queries.record_batch_input(wh, file_id, "generate", api.base_url, [(request.key, "instructions", "p", {}, {})])
        batch = client.create(file_id)
        queries.set_batch_state(wh, file_id, batch.id, batch.status, 0, 0)
        wh.close()
        client.close()
        listed = cli("batches", home=home)
        assert listed.returncode == 0 and batch.id in listed.stdout and "open" in listed.stdout, listed.stderr
        out = cli("batches", "--cancel", batch.id, home=home, OPENAI_API_KEY=KEY)
        assert out.returncode == 0, out.stderr
        assert api.batches[batch.id]["status"] == "cancelling" and "cancelling" in out.stderr
        assert query(home, "SELECT status FROM teacher_batches")[0][0] == "cancelling"
        unknown = cli("batches", "--cancel", "batch_nope", home=home, OPENAI_API_KEY=KEY)
        assert unknown.returncode == 1 and "no batch 'batch_nope'" in unknown.stderr.strip().splitlines()[-1]
        api.release()


@pytest.mark.slow
def test_a_run_killed_between_upload_and_create_finds_or_creates_its_batch(tmp_path):
    """The input file is recorded before the batch is created: the next run adopts a batch the endpoint
    created from it (no second one), or creates the one that was never made. In-process, no teacher:
    the lines fail at the unreachable upstream, which is all this needs."""
    from instructflow.tasks.batch import BatchAPI, batch_line, encode_jsonl
    from instructflow.tasks.batch_generate import BatchGenerator
    from instructflow.tasks.config import load_config
    from instructflow.tasks.teacher import TeacherClient, TeacherRequest, TeacherSettings
    from instructflow.warehouse import queries
    from instructflow.warehouse.store import open_warehouse

    cfg = load_config("tiny")
    cfg = cfg.replace(teacher={"mode": "batch", "endpoint": "http://127.0.0.1:9/v1", "batch_poll_s": 0.05})
    (tmp_path / "home").mkdir()
    wh = open_warehouse(tmp_path / "home")
    with BatchServer("http://127.0.0.1:9", api_key=KEY) as api:
        settings = TeacherSettings(base_url=api.base_url, model="m", api_key=KEY)
        client = BatchAPI(settings)
        uploads = []
        for index in range(2):
            request = TeacherRequest(key=f"instructions:{index:06d}", prompt="p", params={"max_tokens": 4})
            uploads.append(client.upload(encode_jsonl([batch_line(request, settings)])))
            queries.record_batch_input(wh, uploads[-1], "generate", api.base_url,
                                       [(request.key, "instructions", "p", {}, {"n_demos": 1})])
        adopted = client.create(uploads[0]).id   # created at the endpoint, the id never recorded
        client.close()
        generator = BatchGenerator(wh, cfg, TeacherClient(settings))
        generator.jobs.finish_open()
        generator.jobs.close()
        assert api.created[0] == adopted and len(api.created) == 2       # adopted one, created the missing one
        assert api.keys[api.created[1]] == ["instructions:000001"]
        assert [(r["batch_id"], r["status"]) for r in wh.rows(
            "SELECT batch_id, status FROM teacher_batches ORDER BY created_at")] == [(b, "completed") for b in api.created]
        assert queries.open_batches(wh) == []
        assert all("502" in r["error"] for r in wh.rows("SELECT error FROM teacher_batch_requests"))
    wh.close()


@pytest.mark.slow
def test_alpaca_recipe_sends_one_batch_for_all_its_prompts(tmp_path, teacher, api):
    """In-process (the stage's CLI path is the end-to-end test's): no instance step, one batch."""
    import asyncio

    from instructflow.flows.common import seed_paths
    from instructflow.tasks.batch_generate import BatchGenerator
    from instructflow.tasks.config import load_config
    from instructflow.tasks.seeds import load_seeds
    from instructflow.tasks.teacher import TeacherClient, TeacherSettings
    from instructflow.warehouse import queries
    from instructflow.warehouse.store import open_warehouse

    cfg = load_config("tiny")
    cfg = cfg.replace(teacher={"mode": "batch", "endpoint": "http://127.0.0.1:9/v1", "batch_poll_s": 0.1},
                      generate={"recipe": "alpaca", "max_requests": 3, "target_kept": 1000, "max_tokens": 16})
    (tmp_path / "home").mkdir()
    wh = open_warehouse(tmp_path / "home")
    queries.replace_seed_tasks(wh, load_seeds(seed_paths(cfg), max_chars=cfg.generate.max_seed_chars))
    settings = TeacherSettings(base_url=api.base_url, model=teacher.model_name, api_key=KEY)
    asyncio.run(BatchGenerator(wh, cfg, TeacherClient(settings)).run())
    assert [api.keys[b] for b in api.created] == [[f"instructions:{i:06d}" for i in range(3)]]
    assert wh.scalar("SELECT count(*) FROM teacher_requests WHERE error IS NULL AND purpose = 'instructions'") == 3
    wh.close()


# --- the judge (preferences, evaluate) in batch mode ----------------------------------------------
JUDGED = [("Name a primary colour.", "Red.", "Banana."), ("What is 2 + 2?", "4", "22")]


@pytest.mark.slow
def test_judge_in_batch_mode_resends_only_failed_and_unrun_lines_and_never_re_asks(tmp_path, teacher, api):
    """In-process (the stage's CLI path, with a kill, is the next test): 2 pairs = 4 verdict requests."""
    import asyncio

    from instructflow.tasks.batch import BatchJobs
    from instructflow.tasks.judge import judge_pairs, judge_requests
    from instructflow.tasks.teacher import TeacherSettings
    from instructflow.warehouse.store import open_warehouse

    (tmp_path / "home").mkdir()
    wh = open_warehouse(tmp_path / "home")
    settings = TeacherSettings(base_url=api.base_url, model=teacher.model_name, api_key=KEY,
                               prices={teacher.model_name: (2.0, 4.0)})

    def judge(force: bool = False) -> list[dict]:
        jobs = BatchJobs(wh, "evaluate", settings, {}, poll_s=0.1)
        try:
            return asyncio.run(judge_pairs(wh, settings, "evaluate", JUDGED, force=force, jobs=jobs))
        finally:
            jobs.close()

    keys = [r.key for inst, a, b in JUDGED for r in judge_requests(teacher.model_name, inst, a, b)]
    api.plans.append(Plan(fail_lines={1}, expire_after=3))      # lines 0, 2 answered; 1 fails; 3 never runs
    rows = judge()
    first, second = api.created
    assert api.keys[first] == sorted(keys) and api.keys[second] == sorted(keys)[1::2]
    assert all(r["judge_text_ab"] is not None and r["judge_text_ba"] is not None for r in rows)
    stored = wh.rows("SELECT request_key, stage, purpose, error, prompt_tokens, completion_tokens, cost_usd "
                     "FROM teacher_requests ORDER BY 1")
    assert [r["request_key"] for r in stored] == sorted(keys)
    assert {(r["stage"], r["purpose"], r["error"]) for r in stored} == {("evaluate", "judge", None)}
    assert all(r["cost_usd"] == pytest.approx((r["prompt_tokens"] * 1.0 + r["completion_tokens"] * 2.0) / 1e6)
               for r in stored)                                  # half of `prices`
    assert [(r["request_key"], r["error"]) for r in wh.rows("SELECT * FROM teacher_request_history")] == \
        [(sorted(keys)[1], "HTTP 500: simulated server error")]   # the failure is on record
    assert judge() == rows and len(api.created) == 2             # stored verdicts: no new batch
    judge(force=True)                                            # --force: one batch asks all four again
    assert len(api.created) == 3 and api.keys[api.created[2]] == sorted(keys)
    assert wh.scalar("SELECT count(*) FROM teacher_request_history") == 5
    assert wh.scalar("SELECT count(*) FROM teacher_requests") == 4
    wh.close()


@pytest.mark.slow
def test_preferences_stage_in_batch_mode_killed_while_polling_resumes_the_same_batch(tmp_path, teacher, api,
                                                                                     prefect_api):
    """The real CLI: `run --stages filter,sft` on the tiny profile gives the SFT model to sample from;
    the preferences stage's judge batch is held open, the stage SIGKILLed, and the rerun collects it."""
    from instructflow.tasks.preferences import pair_key

    home = tmp_path / "home"
    config = batch_config(tmp_path, api, teacher, "")
    sft = cli("run", "--profile", "tiny", "--stages", "filter,sft", home=home, **shared_api())
    assert sft.returncode == 0, sft.stderr[-3000:]
    first = kill_while_polling(api, "preferences", config, home, deadline_s=240, **shared_api())
    status = json.loads(cli("status", "--json", "--profile", "t", "--config", str(config), home=home).stdout)
    assert status["open_batches"] == [first]
    api.release()

    out = cli("stage", "preferences", "--profile", "t", "--config", str(config), home=home,
              OPENAI_API_KEY=KEY, **shared_api())
    assert out.returncode == 0, out.stderr[-3000:]
    assert api.created == [first] and api.retrieves[-1][1] == first   # polled the same batch, created none
    judged = query(home, "SELECT prompt, response_a, response_b, pair_key FROM preference_pairs WHERE source = 'judged'")
    assert judged and all(key == pair_key(p, a, b) for p, a, b, key in judged)
    assert query(home, "SELECT count(*), count(DISTINCT request_key), count(error) FROM teacher_requests "
                       "WHERE purpose = 'judge'")[0] == (len(api.keys[first]), len(api.keys[first]), 0)
    assert len(api.keys[first]) == 2 * len(judged)               # both orders of every judged pair, in one batch
    assert [s for (s,) in query(home, "SELECT status FROM stage_runs WHERE stage = 'preferences' "
                                      "ORDER BY started_at")] == ["failed", "success"]
    assert KEY.encode() not in (home / "warehouse.duckdb").read_bytes()
