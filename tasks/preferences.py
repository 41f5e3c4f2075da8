"""Preference data as pure logic: reading external preference files and pairing sampled responses.

Accepted JSONL line forms (TRL's, the field's):
- explicit prompt: {"prompt": str, "chosen": str, "rejected": str}
- implicit prompt, strings: {"chosen": str, "rejected": str}: the prompt is their longest common
  prefix (cut back to a line or word boundary), the responses are what follows it;
- conversational: "chosen"/"rejected" (and optional "prompt") as lists of {"role","content"}
  messages: the prompt is the user turns before the final assistant turn.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


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


def _split_common_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
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
            prompt = "\n\n".join(m.get("content", "") for m in prompt if isinstance(m, dict))
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


def load_preference_file(path: str | Path) -> list[PreferencePair]:
    """All-or-nothing: the first bad line raises, naming file and line; nothing is half-imported."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceFormatError(f"{path}: preference file not found")
    pairs = []
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PreferenceFormatError(f"{where}: invalid JSON ({exc.msg})") from None
            pairs.append(parse_preference_line(obj, where))
    if not pairs:
        raise PreferenceFormatError(f"{path}: no preference pairs in file")
    return pairs


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
