"""Preference data as pure logic: reading external preference files and pairing sampled responses.

Accepted JSONL line forms (TRL's, the field's):
- explicit prompt: {"prompt": str, "chosen": str, "rejected": str}
- implicit prompt, strings: {"chosen": str, "rejected": str}: the prompt is their longest common
  prefix (cut back to a line or word boundary), the responses are what follows it;
- conversational: "chosen"/"rejected" (and optional "prompt") as lists of {"role","content"}
  messages: the prompt is the user turns before the final assistant turn.

Files are read one line at a time (`iter_preference_file`), as bytes decoded per line, so a file of
any size takes constant memory and every problem is one `FILE:LINE: what is wrong` line.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence


class PreferenceFormatError(ValueError):
    """`path:line: what is wrong`, one line."""


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    origin: str          # "file:line"

    @property
    def key(self) -> str:
        return pair_key(self.prompt, self.chosen, self.rejected)


def pair_key(prompt: str, first: str, second: str) -> str:
    return hashlib.sha256(json.dumps([prompt, first, second]).encode()).hexdigest()[:24]


def _messages_text(messages: Any, where: str) -> tuple[str, str]:
    """(prompt, final assistant reply) from a list of chat messages."""
    if not isinstance(messages, list) or not messages:
        raise PreferenceFormatError(f"{where}: expected a non-empty list of messages")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise PreferenceFormatError(f"{where}: every message needs string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise PreferenceFormatError(f"{where}: the last message must be the assistant's reply")
    prompt = "\n\n".join(m["content"] for m in messages[:-1] if m["role"] in ("user", "system"))
    return prompt, messages[-1]["content"]


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix, by halving with C-speed slice compares (a per-character
    Python loop cost ~50 us on a 1,000-character HH-RLHF transcript; this, ~2 us)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _split_common_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    n = _common_prefix_len(chosen, rejected)
    # back off to a boundary so a shared first word of both replies stays in the replies
    cut = max(chosen.rfind("\n", 0, n), chosen.rfind(" ", 0, n)) + 1 if n < min(len(chosen), len(rejected)) else n
    return chosen[:cut].strip(), chosen[cut:].strip(), rejected[cut:].strip()


def parse_preference_line(obj: Any, where: str) -> PreferencePair:
    if not isinstance(obj, dict):
        raise PreferenceFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for field in ("chosen", "rejected"):
        if field not in obj:
            raise PreferenceFormatError(f"{where}: missing field '{field}'")
    chosen, rejected, prompt = obj["chosen"], obj["rejected"], obj.get("prompt")
    if isinstance(chosen, list) or isinstance(rejected, list):
        prompt_c, chosen_text = _messages_text(chosen, f"{where}: chosen")
        prompt_r, rejected_text = _messages_text(rejected, f"{where}: rejected")
        if isinstance(prompt, list):
            prompt = "\n\n".join(m["content"] for m in prompt
                                   if isinstance(m, dict) and isinstance(m.get("content"), str))
        prompt = prompt if isinstance(prompt, str) and prompt else prompt_c
        if not prompt_c == prompt_r and not obj.get("prompt"):
            raise PreferenceFormatError(f"{where}: chosen and rejected conversations have different prompts")
        chosen, rejected = chosen_text, rejected_text
    elif not (isinstance(chosen, str) and isinstance(rejected, str)):
        raise PreferenceFormatError(f"{where}: 'chosen' and 'rejected' must be strings or message lists")
    elif prompt is None:
        prompt, chosen, rejected = _split_common_prefix(chosen, rejected)
        if not prompt:
            raise PreferenceFormatError(f"{where}: no 'prompt' and chosen/rejected share no prefix to take it from")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PreferenceFormatError(f"{where}: 'prompt' must be a non-empty string")
    if not chosen.strip() or not rejected.strip():
        raise PreferenceFormatError(f"{where}: 'chosen' and 'rejected' must be non-empty")
    if chosen.strip() == rejected.strip():
        raise PreferenceFormatError(f"{where}: 'chosen' and 'rejected' are identical")
    return PreferencePair(prompt.strip(), chosen.strip(), rejected.strip(), where)


@dataclass
class FileScan:
    """What one pass over a preference file found (filled in while its pairs are read)."""
    path: Path
    max_field_chars: int | None
    sha256: str = ""            # SHA-256 of every byte read, set once the pass reached the end of the file
    bytes: int = 0
    pairs: int = 0              # valid pairs within the limit: what an import offers the warehouse
    refused_too_long: int = 0   # valid pairs with a prompt, chosen or rejected over max_field_chars


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _decode_line(raw: bytes, where: str) -> tuple[Any, bool]:
    """(the line's JSON value, whether its text holds a \\u escape)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PreferenceFormatError(f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} "
                                    "of the line)") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PreferenceFormatError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # a 5,000-digit number, nesting deeper than the parser goes
        raise PreferenceFormatError(f"{where}: invalid JSON: {str(exc).splitlines()[0]}") from None
    return obj, "\\u" in text


def _check_text(pair: PreferencePair, where: str) -> None:
    """A JSON escape can spell half a surrogate pair (\\ud800), a str no database or tokenizer can encode."""
    for name in ("prompt", "chosen", "rejected"):
        try:
            getattr(pair, name).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PreferenceFormatError(f"{where}: '{name}' holds an unpaired surrogate escape "
                                        f"(\\u{ord(exc.object[exc.start]):04x}), which is not text") from None


def iter_preference_file(path: str | Path, max_field_chars: int | None = None,
                         scan: FileScan | None = None) -> Iterator[PreferencePair]:
    """The file's pairs, one line at a time: memory stays flat however many lines the file has.

    Bytes are decoded line by line, so every problem (not UTF-8, not JSON, a wrong or missing field,
    chosen == rejected, ...) raises PreferenceFormatError `FILE:LINE: what is wrong` on one line. A
    valid pair whose prompt, chosen or rejected is longer than `max_field_chars` characters is not
    yielded but counted in `scan.refused_too_long`. `scan` (optional) is filled in as the file is read;
    its `sha256` is set when the last line was read."""
    path = Path(path)
    scan = scan if scan is not None else FileScan(path, max_field_chars)
    digest = hashlib.sha256()
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise PreferenceFormatError(f"{path}: preference file not found") from None
    except OSError as exc:
        raise PreferenceFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    prefix = str(path)
    with handle:
        for number, raw in enumerate(handle, start=1):
            digest.update(raw)
            scan.bytes += len(raw)
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                raw = raw[3:]
            if not raw.strip():
                continue
            where = f"{prefix}:{number}"
            obj, escaped = _decode_line(raw, where)
            try:
                pair = parse_preference_line(obj, where)
            except PreferenceFormatError:
                raise
            except (TypeError, AttributeError, KeyError, ValueError) as exc:  # a shape the checks above missed
                raise PreferenceFormatError(f"{where}: unexpected value ({type(exc).__name__}: "
                                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
            if escaped:
                _check_text(pair, where)
            if max_field_chars is not None and max(len(pair.prompt), len(pair.chosen),
                                                   len(pair.rejected)) > max_field_chars:
                scan.refused_too_long += 1
                continue
            scan.pairs += 1
            yield pair
    if not scan.pairs and not scan.refused_too_long:
        raise PreferenceFormatError(f"{path}:1: no preference pairs in the file")
    scan.sha256 = digest.hexdigest()


def check_preference_file(path: str | Path, max_field_chars: int | None = None) -> FileScan:
    """Read the whole file and keep nothing but the counts and the hash: raises on the first bad line."""
    scan = FileScan(Path(path), max_field_chars)
    for _ in iter_preference_file(path, max_field_chars, scan):
        pass
    return scan


def load_preference_file(path: str | Path, max_field_chars: int | None = None) -> list[PreferencePair]:
    """Every pair of a (small) file as a list; raises on the first bad line, naming file and line."""
    return list(iter_preference_file(path, max_field_chars))


def sample_pairs(n_samples: int) -> list[tuple[int, int]]:
    """Disjoint consecutive pairs of a prompt's samples: (0,1), (2,3), ... (each sample judged once)."""
    return [(i, i + 1) for i in range(0, n_samples - 1, 2)]


def hashed_order(items: Sequence[str], seed: int) -> list[int]:
    """A seeded, order-independent ordering of items (indices), for picking prompt subsets."""
    return sorted(range(len(items)), key=lambda i: hashlib.sha256(f"{seed}:{items[i]}".encode()).hexdigest())


def split_pairs(pairs: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) by a seeded hash of each pair's `pair_key`: the reward model trains on the first
    part; evaluate's held-out reward model (`evaluate.holdout_reward`) trains on the second."""
    order = hashed_order([p["pair_key"] for p in pairs], seed)
    n_eval = max(1, round(len(pairs) * eval_fraction)) if len(pairs) >= 2 else 0
    held = set(order[:n_eval])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]
