"""Every secret the tool may see, and the one rule that takes them out of whatever it writes.

The secrets: the teacher API key (the value of the env var named by `teacher.api_key_env`, or of
INSTRUCTFLOW_TEACHER_API_KEY), credentials inside an endpoint URL (its userinfo, `user:key@`, and
key-like query parameters, `?api-key=...`, `?key=...`, `?access_token=...`), bearer tokens and
Authorization-like headers a server may echo back. `redact(text)` replaces each with `***`:

  - the secret values this process has read (`remember`: the config loader, `teacher_api_key` and
    `TeacherSettings` call it), wherever they appear, raw or percent-encoded;
  - by shape, whether or not they were read here: the userinfo of any `scheme://user:pass@host` URL,
    the value of a key-like query parameter, `Authorization: Bearer|Basic ...` / `x-api-key: ...`
    headers, `Bearer <token>`, and OpenAI-style `sk-...` keys.

Every sink applies it: the console's error line (flows/cli.py), `stage_runs.error` and the traceback
file (flows/common.py `stage_context`), log handlers (`RedactSecrets`, on every handler: console.log,
Prefect's console and API handlers), teacher error strings (tasks/teacher.py), artifacts and the report.

An endpoint is kept as two strings: `public_url(url)`, the URL with its credentials masked, is what
the config holds (so hashes, Prefect's flow-run parameters, DuckDB and messages never see them), and
`real_endpoint(public)` gives back the URL requests go to (`remember_endpoint` records the pair).
Pure: no I/O; the only state is this process's list of secrets it has seen.
"""
from __future__ import annotations

import logging
import re
import threading
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

MASK = "***"
MIN_SECRET_CHARS = 4  # shorter values are not redacted literally (the shape rules still apply)
NOT_SECRETS = frozenset({"none", "null", "embedded", MASK})

# a query parameter whose name is, or ends in, one of these words carries a credential
_KEY_WORDS = (r"api[_\-]?key|apikey|key|access[_\-]?token|refresh[_\-]?token|id[_\-]?token|token|auth|"
              r"authorization|secret|client[_\-]?secret|password|passwd|pwd|signature|sig|credentials?")
_KEY_NAME = re.compile(rf"(?i)^(?:[\w.\-]*[_.\-])?(?:{_KEY_WORDS})$")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s/@'\"<>]+@")
_QUERY_KEY = re.compile(rf"(?i)([?&;](?:[\w.\-]*[_.\-])?(?:{_KEY_WORDS})=)[^&#\s'\"<>]+")
_HEADER = re.compile(r"(?i)\b((?:proxy-)?authorization|x-api-key|api[_\-]?key|apikey|openai[_\-]api[_\-]key)"
                     r"(\"?'?\s*[:=]\s*\"?'?)(?:(bearer|basic|token)\s+)?[^\s\"',;}\]]+")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9\-._~+/]{8,}=*")
_SK_KEY = re.compile(r"\bsk-[A-Za-z0-9_\-]{20,}")

_lock = threading.Lock()
_known: set[str] = set()
_endpoints: dict[str, str] = {}  # public (masked) URL -> the URL requests go to


def remember(*values: str | None) -> None:
    """Values to redact wherever they appear from now on in this process (raw and percent-encoded)."""
    with _lock:
        for value in values:
            if not value or value.lower() in NOT_SECRETS:
                continue
            for form in {value, unquote(value), quote(value, safe=""), quote(value)}:
                if len(form) >= MIN_SECRET_CHARS and form.lower() not in NOT_SECRETS:
                    _known.add(form)


def url_secrets(url: str) -> list[str]:
    """The credentials inside a URL: its userinfo's password (or a lone username: a token), and the
    values of key-like query parameters."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = []
    if parts.password:
        found.append(parts.password)
    elif parts.username:
        found.append(parts.username)
    found += [value for name, value in parse_qsl(parts.query, keep_blank_values=True) if _KEY_NAME.match(name)]
    return [value for value in found if value]


def public_url(url: str) -> str:
    """`url` with its userinfo and key-like query values replaced by ***; unchanged when it has none."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact(url)
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = _QUERY_KEY.sub(lambda m: m.group(1) + MASK, "?" + parts.query)[1:] if parts.query else parts.query
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def remember_endpoint(url: str) -> str:
    """Record an endpoint's credentials as secrets and its real URL under its public form; returns the
    public form (what a config holds and every message names)."""
    public = public_url(url)
    if public != url:
        remember(*url_secrets(url))
        with _lock:
            _endpoints[public] = url
    return public


def real_endpoint(url: str) -> str:
    """The URL requests go to for a public (masked) endpoint this process has seen; else `url` itself."""
    with _lock:
        return _endpoints.get(url, url)


def _header(match: re.Match) -> str:
    scheme = f"{match.group(3)} " if match.group(3) else ""
    return f"{match.group(1)}{match.group(2)}{scheme}{MASK}"


def redact(text: str) -> str:
    """`text` with every secret this process knows, and every credential recognisable by its shape, masked."""
    if not text:
        return text
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, MASK)
    text = _USERINFO.sub(lambda m: m.group(1) + MASK + "@", text)
    text = _QUERY_KEY.sub(lambda m: m.group(1) + MASK, text)
    text = _HEADER.sub(_header, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", text)
    return _SK_KEY.sub(MASK, text)


def redact_exception(exc: BaseException) -> BaseException:
    """Mask secrets in the string arguments of `exc` and the exceptions it was raised from, in place,
    so whoever reads it next (Prefect's state message, a traceback, a log line) sees them masked."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        try:
            args = tuple(redact(a) if isinstance(a, str) else a for a in current.args)
            if args != current.args:
                current.args = args
        except Exception:  # an exception type with read-only args: its message stays as it was
            pass
        current = current.__cause__ or current.__context__
    return exc


class RedactSecrets(logging.Filter):
    """On a handler: the record's message, exception text and stack text are masked before any
    formatter (a file, the console, Prefect's API log handler) sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True  # a broken record: the handler reports it as it would have
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def redact_log_handlers(*loggers: logging.Logger) -> None:
    """Put `RedactSecrets` on every handler of the root logger, of every configured logger, and of
    `loggers` (idempotent)."""
    manager = logging.Logger.manager
    candidates = [logging.getLogger(), *loggers,
                  *(lg for lg in list(manager.loggerDict.values()) if isinstance(lg, logging.Logger))]
    for logger in candidates:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactSecrets) for f in handler.filters):
                handler.addFilter(RedactSecrets())
