"""The one redaction rule (tasks/secrets.py) on strings, configs and log records: every secret the tool may
see (the API key env vars, URL userinfo, key-like query parameters, bearer tokens and Authorization-like
headers) is masked; the URL requests go to keeps its credentials. The CLI end to end:
tests/test_secrets.py."""
from __future__ import annotations

import json
import logging
import uuid

from instructflow.tasks import secrets


def test_public_url_masks_userinfo_and_key_like_query_values_only():
    url = "https://user:p%40ss-word@api.example.com:8443/v1?api-key=K1&api-version=2024&access_token=K2&max_tokens=5"
    assert secrets.public_url(url) == \
        "https://***@api.example.com:8443/v1?api-key=***&api-version=2024&access_token=***&max_tokens=5"
    assert secrets.url_secrets(url) == ["p%40ss-word", "K1", "K2"]
    assert secrets.remember_endpoint(url) == secrets.public_url(url) and secrets.real_endpoint(secrets.public_url(url)) == url
    assert secrets.redact("said p@ss-word and p%40ss-word") == "said *** and ***"  # decoded and as written
    for clean in ("https://api.openai.com/v1", "http://127.0.0.1:8000/v1", "embedded"):
        assert secrets.public_url(clean) == clean


def test_redact_masks_every_kind_of_secret_by_value_and_by_shape():
    key = f"k/{uuid.uuid4().hex[:8]}+x"
    secrets.remember(key, "none", "ab")  # "none" (no key) and too-short values are not secrets
    text = (f"raw {key}, encoded {key.replace('/', '%2F').replace('+', '%2B')} | POST http://bob:hunter2@h:1/v1/x?key=abc&sig=s1&n=2 | "
            "Authorization: Bearer tok.en-123456 | {'authorization': 'Basic dXNlcjpwYXNz'} | x-api-key: K-9 | "
            "sent bearer abcdefgh12345 | an sk-abcdefghijklmnopqrstuvwx key | none of it, ab")
    assert secrets.redact(text) == (
        "raw ***, encoded *** | POST http://***@h:1/v1/x?key=***&sig=***&n=2 | Authorization: Bearer *** | "
        "{'authorization': 'Basic ***'} | x-api-key: *** | sent bearer *** | an *** key | none of it, ab")
    assert secrets.redact("mail a@b.example, see http://h/p?email=a@b and max_tokens=5") == \
        "mail a@b.example, see http://h/p?email=a@b and max_tokens=5"


def test_a_config_holds_the_masked_endpoint_and_requests_get_the_real_one(monkeypatch):
    from fastapi.encoders import jsonable_encoder  # what Prefect stores a flow run's parameters with

    from instructflow.tasks.config import load_config, teacher_endpoint
    from instructflow.tasks.teacher import TeacherSettings

    def endpoint() -> str:
        return f"http://u:{uuid.uuid4().hex}@127.0.0.1:9/v1?api-key=q{uuid.uuid4().hex}"

    monkeypatch.setenv("INSTRUCTFLOW_TEACHER_MODEL", "m")
    monkeypatch.setenv("INSTRUCTFLOW_TEACHER_ENDPOINT", endpoint())
    rotated = load_config("tiny").section_hash("teacher")
    real = endpoint()
    monkeypatch.setenv("INSTRUCTFLOW_TEACHER_ENDPOINT", real)
    cfg = load_config("tiny")
    assert cfg.teacher.endpoint == "http://***@127.0.0.1:9/v1?api-key=***"
    assert teacher_endpoint(cfg.teacher) == real
    stored = json.dumps(jsonable_encoder(cfg))
    assert len(secrets.url_secrets(real)) == 2 and not [s for s in secrets.url_secrets(real) if s in stored]
    assert cfg.section_hash("teacher") == rotated  # another key is not another input: nothing turns stale
    settings = TeacherSettings(base_url=teacher_endpoint(cfg.teacher), model="m")
    args = settings.openai_client_args()  # the openai client appends paths to the base URL's raw text
    assert args["base_url"] == real.split("?")[0] and args["default_query"] == {"api-key": real.split("=")[-1]}
    assert settings.endpoint == cfg.teacher.endpoint


def test_the_log_filter_masks_message_arguments_and_tracebacks(tmp_path):
    secret = f"sk-logged-{uuid.uuid4().hex[:8]}"
    secrets.remember(secret)
    handler = logging.FileHandler(tmp_path / "log.txt")
    logger = logging.getLogger(f"test.secrets.{uuid.uuid4().hex[:6]}")
    logger.addHandler(handler)
    secrets.redact_log_handlers(logger)
    try:
        raise RuntimeError(f"refused http://u:{secret}@h/v1")
    except RuntimeError:
        logger.error("call to %s failed", f"http://h/v1?token={secret}", exc_info=True)
    handler.close()
    written = (tmp_path / "log.txt").read_text()
    assert "http://h/v1?token=*** failed" in written and "RuntimeError: refused http://***@h/v1" in written
    assert secret not in written
