"""AlpacaFarm-style pairwise judge: the prompt, the verdict parser and the rule that combines the
two orders (pure logic), then `judge_pairs`, which asks the teacher (synchronously, or as Batch API
jobs in `teacher.mode = "batch"`) and keeps every verdict in the warehouse (the preferences and
evaluate stages both judge with it).

Each pair is asked twice, once as (a=x, b=y) and once swapped (a=y, b=x), to cancel the judge's
position bias: a pair counts only when both orders agree.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Callable

from instructflow.tasks.batch import MAX_LINES, BatchJobs
from instructflow.tasks.preferences import pair_key
from instructflow.tasks.teacher import TeacherClient, TeacherRequest, TeacherSettings
from instructflow.warehouse import queries
from instructflow.warehouse.store import Warehouse

JUDGE_DECODING: dict = {"temperature": 0.0, "max_tokens": 12}

JUDGE_HEADER = """\
You compare two answers to the same instruction and pick the better one. The better answer follows \
the instruction more closely and is more correct, helpful and clear. Ignore which answer comes first \
and how long it is. Reply with exactly one of: Output (a), Output (b), Tie.

## Instruction:
Name the capital of France.

## Output (a):
The capital of France is Paris.

## Output (b):
The capital of France is Lyon.

## Which is better, Output (a) or Output (b)?
Output (a)

## Instruction:
Give an antonym of "happy".

## Output (a):
Happy is a feeling.

## Output (b):
Sad.

## Which is better, Output (a) or Output (b)?
Output (b)

"""


def pairwise_judge_prompt(instruction: str, output_a: str, output_b: str) -> str:
    return (JUDGE_HEADER
            + f"## Instruction:\n{instruction.strip()}\n\n"
            + f"## Output (a):\n{output_a.strip()}\n\n"
            + f"## Output (b):\n{output_b.strip()}\n\n"
            + "## Which is better, Output (a) or Output (b)?\n")


# "Output (a)", "output a", "Response (b)", "(a)", "[b]" all name a side explicitly.
_NAMES = {side: re.compile(rf"\((?:{side})\)|\[{side}\]|\b(?:output|response)\s*{side}\b")
          for side in ("a", "b")}
_TIE = re.compile(r"\btie\b|\bequally (?:good|bad)\b")
_BARE_LETTER = re.compile(r"^(a|b)(?:[.:!)]?$|[.:,)]?\s+(?:is|wins|better)\b)")


def parse_pairwise_verdict(text: str) -> str | None:
    """"a" | "b" | "tie", or None when the reply names both sides (without calling it a tie), neither,
    or one side and a tie at once.

    The first non-empty line decides when it holds a verdict: small judges answer and then echo the
    prompt (SmolLM2-135M: 'Output (a)\n\nOutput (b):\nParis'). Otherwise the whole reply is read, so
    a preamble line ("Here is my verdict:") does not hide the answer below it."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        first = _verdict(lines[0])
        if first is not None:
            return first
    return _verdict(text)


def _verdict(text: str) -> str | None:
    t = re.sub(r"[*_`#\"']", "", text).strip().lower()
    named = {side for side, pattern in _NAMES.items() if pattern.search(t)}
    tie = bool(_TIE.search(t))
    if not named and not tie:
        bare = _BARE_LETTER.match(t)    # a bare "A", "b.", "A is better"
        return bare.group(1) if bare else None
    if tie:
        return "tie" if len(named) != 1 else None
    return named.pop() if len(named) == 1 else None


def combine_orders(first: str | None, second_swapped: str | None) -> str:
    """first: verdict when asked (a=x, b=y); second_swapped: verdict when asked (a=y, b=x).
    Returns "x" | "y" | "tie" when both orders agree, "disagree" when they differ (a side vs a tie
    counts as a disagreement), "invalid" when either verdict could not be parsed."""
    if first is None or second_swapped is None:
        return "invalid"
    as_first = {"a": "x", "b": "y", "tie": "tie"}
    as_second = {"a": "y", "b": "x", "tie": "tie"}
    if first not in as_first or second_swapped not in as_second:
        raise ValueError(f"verdicts must be 'a', 'b', 'tie' or None, got {first!r} and {second_swapped!r}")
    x_first, x_second = as_first[first], as_second[second_swapped]
    return x_first if x_first == x_second else "disagree"


def win_rate(outcomes: list[str | None], side: str) -> float | None:
    """The share of judged prompts `side` won, a tie counting half; prompts whose two orders
    disagreed or could not be read are not judged. None when nothing was judged."""
    judged = [o for o in outcomes if o not in ("disagree", "invalid", None)]
    if not judged:
        return None
    return sum(1.0 if o == side else 0.5 if o == "tie" else 0.0 for o in judged) / len(judged)


# What a stored verdict depends on besides the pair: editing the prompt or the decoding changes this,
# so old verdicts are not reused for a different question.
JUDGE_PROMPT_VERSION = hashlib.sha256((pairwise_judge_prompt("{instruction}", "{a}", "{b}")
                                       + json.dumps(JUDGE_DECODING, sort_keys=True)).encode()).hexdigest()[:8]


def judge_request_key(judge_model: str, instruction: str, a: str, b: str, order: str) -> str:
    """One verdict's request key: the judge model and the prompt version are part of it, so a new
    judge (or a new prompt) asks again instead of reusing another judge's stored verdict."""
    judge = hashlib.sha256(judge_model.encode()).hexdigest()[:12]
    return f"judge:{JUDGE_PROMPT_VERSION}:{judge}:{pair_key(instruction, a, b)}:{order}"


def judge_requests(judge_model: str, instruction: str, a: str, b: str) -> tuple[TeacherRequest, TeacherRequest]:
    return (TeacherRequest(key=judge_request_key(judge_model, instruction, a, b, "ab"),
                           prompt=pairwise_judge_prompt(instruction, a, b), params=dict(JUDGE_DECODING)),
            TeacherRequest(key=judge_request_key(judge_model, instruction, a, b, "ba"),
                           prompt=pairwise_judge_prompt(instruction, b, a), params=dict(JUDGE_DECODING)))


JUDGE_BATCH_ATTEMPTS = 3  # batch mode: a verdict whose line failed (or never ran) goes into at most this many batches


async def judge_pairs(wh: Warehouse, settings: TeacherSettings, stage: str, pairs: list[tuple[str, str, str]],
                      force: bool = False, jobs: BatchJobs | None = None,
                      on_progress: Callable[[str], None] | None = None) -> list[dict]:
    """Ask the teacher about each (instruction, a, b) in both orders. Verdicts this judge gave before
    are not re-asked unless `force`; a forced answer replaces the stored one (which moves to history).
    `jobs`: batch mode, the requests go as Batch API jobs of this stage.
    Returns rows with verdicts mapped to the (a, b) order and the combined outcome a|b|tie|disagree|invalid."""
    show = on_progress or (lambda line: None)
    requests = [r for inst, a, b in pairs for r in judge_requests(settings.model, inst, a, b)]
    if jobs is not None:
        ask_in_batches(wh, jobs, stage, requests, force, show)
    else:
        stored = {} if force else queries.stored_requests(wh, [r.key for r in requests])
        todo = [r for r in requests if r.key not in stored]
        if todo:
            client = TeacherClient(settings)
            prompts, done = {r.key: r.prompt for r in todo}, []

            def keep(result) -> None:  # stored the moment it finishes: a killed run re-asks nothing
                queries.replace_teacher_result(wh, result, stage, "judge", prompts[result.key])
                done.append(result.key)
                show(f"judged {len(done)}/{len(todo)} requests")

            try:
                await client.complete_all(todo, on_result=keep)
            finally:
                await client.aclose()
    stored = queries.stored_requests(wh, [r.key for r in requests])
    texts = {key: row["texts"][0] if row["texts"] and not row["error"] else None for key, row in stored.items()}
    rows = []
    for inst, a, b in pairs:
        ab, ba = judge_requests(settings.model, inst, a, b)
        verdict_ab = parse_pairwise_verdict(texts.get(ab.key) or "")
        swapped = parse_pairwise_verdict(texts.get(ba.key) or "")
        verdict_ba = {"a": "b", "b": "a"}.get(swapped, swapped)  # mapped back to the (a, b) order
        combined = combine_orders(verdict_ab, swapped)
        outcome = {"x": "a", "y": "b"}.get(combined, combined)
        rows.append({"prompt": inst, "response_a": a, "response_b": b, "verdict_ab": verdict_ab,
                     "verdict_ba": verdict_ba, "outcome": outcome, "judge_model": settings.model,
                     "judge_text_ab": texts.get(ab.key), "judge_text_ba": texts.get(ba.key)})
    return rows


def ask_in_batches(wh: Warehouse, jobs: BatchJobs, stage: str, requests: list[TeacherRequest], force: bool,
                   show: Callable[[str], None]) -> None:
    """Batch mode: first the stage's open batches (a killed run's) are polled and what they answered is
    stored; then every request without a stored verdict (all of them, if forced) goes into a batch, and
    again while lines fail or go unrun, up to JUDGE_BATCH_ATTEMPTS batches per key. A key an open
    batch holds is never sent again, so a rerun pays for nothing twice."""
    asked_now: set[str] = set()  # stored in this call: a forced request counts as answered once it is
    while True:
        jobs.finish_open()
        answered = jobs.answered()  # a collected batch is stored in one transaction
        queries.replace_teacher_results(wh, [queries.teacher_request_row(jobs.result_of(state), stage, "judge",
                                                                         state["prompt"]) for state in answered.values()])
        asked_now.update(answered)
        states, stored = jobs.states(), queries.stored_requests(wh, [r.key for r in requests])
        todo = []
        for request in requests:
            row = stored.get(request.key)
            if row is not None and (request.key in asked_now or not force):
                tried = states.get(request.key, {}).get("batches", 0)
                if row["error"] is None or tried >= JUDGE_BATCH_ATTEMPTS:
                    continue
            todo.append(request)
        if not todo:
            return
        jobs.check_sendable([r.key for r in todo], states, JUDGE_BATCH_ATTEMPTS, f"{stage} judge")
        show(f"submitting {min(len(todo), MAX_LINES)} judge requests as a batch")
        jobs.submit([(r, "judge", {}) for r in todo[:MAX_LINES]])
