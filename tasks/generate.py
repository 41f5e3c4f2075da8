"""The generate loop: a streaming scheduler over one queue of teacher requests.

Up to the client's in-flight limit, requests are always on the wire: instruction requests and the
instance steps (classify, then instances) of newly kept instructions, interleaved, no barrier. Each
result is handled the moment it arrives: parsed, and its candidates judged greedily against the
in-memory pool (seeds + kept so far), which is also where machine demonstrations come from.
Candidate ids are handed out in that handling order, so `candidate_id` order is the recorded order
the filter stage re-derives the same verdicts in.

Every request has a deterministic key (`instructions:000042`, `classify:<candidate>`,
`instances:<candidate>`; with generate.instance_prompt = "chat", `instance_input:<candidate>` and
`instance_output:<candidate>`). Results are written in group commits (every `generate.commit_every`
results or `generate.commit_ms`), one transaction per batch with a request's candidates and
instances, so a SIGKILL loses at most the uncommitted batch. Resume is by construction: the next
instruction keys are the missing (or failed, within `generate.key_attempts`) keys below the highest
stored one, then new ones; nothing stored is ever resent and no row is duplicated. A stored failure
is history: a rerun retries it and the failed row moves to `teacher_request_history`.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from instructflow.tasks import recipes
from instructflow.tasks.config import Config
from instructflow.tasks.heuristics import heuristic_reject_reason
from instructflow.tasks.rouge import NearDuplicateFilter
from instructflow.tasks.teacher import TeacherClient, TeacherRequest, TeacherResult
from instructflow.warehouse import queries
from instructflow.warehouse.store import Warehouse


def seed_pool_id(seed_id: str) -> str:
    return f"seed:{seed_id}"


def candidate_pool_id(candidate_id: int) -> str:
    return f"cand:{candidate_id}"


def build_filter(cfg: Config, seeds: list[dict]) -> NearDuplicateFilter:
    near_dup = NearDuplicateFilter(threshold=cfg.filter.threshold, top_k=cfg.filter.top_k,
                                   tokenizer=cfg.filter.tokenizer, with_mean=cfg.filter.with_mean)
    for seed in seeds:
        near_dup.add(seed_pool_id(seed["seed_id"]), seed["instruction"])
    return near_dup


def truncation_policy(cfg: Config) -> str:
    if cfg.generate.truncation != "recipe":
        return cfg.generate.truncation
    return "drop_response" if cfg.generate.recipe == "self-instruct" else "drop_last"


def judge_candidate(cfg: Config, near_dup: NearDuplicateFilter, instruction: str, truncated: bool,
                    pool_id: Callable[[], str]) -> tuple[str, str | None, str | None, Any]:
    """(verdict, reason, heuristic_reason, rouge Verdict or None) for one candidate, in arrival order.
    The filter stage calls this same function when it re-derives every verdict."""
    heuristic = "truncated" if truncated else heuristic_reject_reason(
        instruction, blacklist=cfg.filter.blacklist, min_words=cfg.filter.min_words,
        max_words=cfg.filter.max_words)
    if heuristic:
        return "rejected", heuristic, heuristic, None
    verdict = near_dup.offer(pool_id(), instruction)
    return ("kept", None, None, verdict) if verdict.kept else ("rejected", "near_duplicate", None, verdict)


class GenerateFailed(RuntimeError):
    """The stage cannot succeed (endpoint refuses us, or most requests failed): one line says why."""


def instruction_key(index: int) -> str:
    return f"instructions:{index:06d}"


def instruction_keys_to_send(states: list[dict], max_requests: int, key_attempts: int) -> tuple[list[int], int]:
    """(keys below the frontier to send first: missing or failed with attempts left, the frontier).
    The frontier is one past the highest stored key; new keys are numbered from there."""
    stored: dict[int, dict] = {int(row["request_key"].split(":")[1]): row for row in states}
    frontier = max(stored, default=-1) + 1
    todo = [i for i in range(min(frontier, max_requests))
            if i not in stored or (stored[i]["failed"] and 1 + stored[i]["replaced"] < key_attempts)]
    return todo, frontier


@dataclass
class Tally:
    """Live numbers for the progress bar and the stage metrics (kept: in total; the rest: this run)."""
    requests: int = 0
    failed: int = 0
    retries: int = 0
    candidates: int = 0
    kept: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    rejected: Counter = field(default_factory=Counter)
    in_flight: int = 0
    limit: int = 0
    throttled: int = 0
    commits: int = 0
    started: float = field(default_factory=time.monotonic)
    cpu_started: float = field(default_factory=time.process_time)
    cpu_s: float = 0.0  # CPU of the whole process (loop, commit thread, progress bar), as of the last update

    def add_result(self, result: TeacherResult) -> None:
        self.requests += 1
        self.failed += 0 if result.ok else 1
        self.prompt_tokens += result.prompt_tokens
        self.completion_tokens += result.completion_tokens
        self.cost_usd += result.cost_usd

    @property
    def requests_per_s(self) -> float:
        return self.requests / max(time.monotonic() - self.started, 1e-9)

    @property
    def cpu_ms_per_request(self) -> float:
        """Process CPU per request: what bounds the rate on a busy machine, unlike wall time."""
        return 1000 * self.cpu_s / max(self.requests, 1)

    def line(self, target: int) -> str:
        top = ", ".join(f"{k}={v}" for k, v in self.rejected.most_common(4)) or "none"
        return (f"kept {self.kept}/{target} · req {self.requests} ({self.requests_per_s:.1f}/s, in flight "
                f"{self.in_flight}/{self.limit}, failed {self.failed}, retries {self.retries}, "
                f"throttled {self.throttled}) · cand {self.candidates} · rejects: {top} · "
                f"tok {self.prompt_tokens}+{self.completion_tokens} · ${self.cost_usd:.4f}")


@dataclass
class InstructionWork:
    index: int
    replaces: bool  # a stored failed attempt of this key is replaced by this one
    request: TeacherRequest | None = None
    n_demos: int = 0
    result: TeacherResult | None = None


@dataclass
class InstanceWork:
    candidate_id: int
    instruction: str
    replaces: bool
    classify: tuple[TeacherResult, str] | None = None  # (result, prompt) of the first step: classify or instance_input
    instances: tuple[TeacherResult, str] | None = None
    is_classification: bool = False
    chat_input: str = ""  # instance_prompt = "chat": the input the first request wrote


class Generator:
    def __init__(self, wh: Warehouse, cfg: Config, client: TeacherClient,
                 on_update: Callable[[Tally], None] | None = None):
        self.wh, self.cfg, self.client = wh, cfg, client
        self.on_update = on_update or (lambda tally: None)
        self.tally = Tally()
        self.seeds = queries.seed_rows(wh)
        self.seed_demos = [recipes.Demo(instruction=s["instruction"],
                                        input=(s["instances"][0]["input"] if s["instances"] else ""),
                                        output=(s["instances"][0]["output"] if s["instances"] else ""),
                                        is_classification=bool(s["is_classification"])) for s in self.seeds]
        # The pool machine demonstrations come from is the deduplicated kept set, as in self-instruct;
        # read once: from here on the in-memory filter index is the pool.
        self.near_dup = build_filter(cfg, self.seeds)
        self.machine_demos: list[recipes.Demo] = []
        for row in queries.kept_candidates(wh):
            self.near_dup.add(candidate_pool_id(row["candidate_id"]), row["instruction"])
            self.machine_demos.append(recipes.Demo(instruction=row["instruction"]))
        self.tally.kept = self.kept_at_start = len(self.machine_demos)
        self.batch = queries.GenerateBatch()
        self.batch_started = time.monotonic()
        self.committing: asyncio.Future | None = None
        self.free_ids: deque[int] = deque()
        self.instructions_handled = 0
        self.instructions_in_flight = 0
        self._last_update = 0.0
        self.chat_instances = cfg.generate.instance_prompt == "chat"

    # --- prompts --------------------------------------------------------------------------------
    def _decoding(self, base: dict, max_tokens: int) -> dict:
        params = dict(base)
        if max_tokens:
            params["max_tokens"] = max_tokens
        return params

    def instruction_request(self, index: int) -> tuple[TeacherRequest, int]:
        generate_cfg = self.cfg.generate
        rng = random.Random(f"{generate_cfg.seed}:{index}")  # same draws for the same key (from the pool as it is then)
        if generate_cfg.recipe == "self-instruct":
            demos = recipes.sample_demos(self.seed_demos, self.machine_demos, rng, n_total=generate_cfg.n_demos,
                                         n_machine=generate_cfg.n_machine_demos)
            prompt = recipes.self_instruct_prompt(demos)
            params = self._decoding(recipes.SELF_INSTRUCT_DECODING, generate_cfg.max_tokens)
        else:
            demos = rng.sample(self.seed_demos, min(generate_cfg.alpaca_demos, len(self.seed_demos)))
            prompt = recipes.alpaca_prompt(demos, n_requested=generate_cfg.alpaca_instructions)
            params = self._decoding(recipes.ALPACA_DECODING, generate_cfg.max_tokens)
        return TeacherRequest(key=instruction_key(index), prompt=prompt, params=params), len(demos)

    # --- the requests (run concurrently) -------------------------------------------------------
    async def send_instructions(self, work: InstructionWork) -> InstructionWork:
        work.request, work.n_demos = self.instruction_request(work.index)
        work.result = await self.client.complete(work.request, on_retry=self._count_retry)
        return work

    def instance_step_keys(self) -> tuple[str, str]:
        """The purposes (and key prefixes) of an instance step's two requests. The chat style has
        its own keys, so a home that switches styles never meets a stored key of the other one."""
        return ("instance_input", "instance_output") if self.chat_instances else ("classify", "instances")

    def first_instance_request(self, candidate_id: int, instruction: str) -> TeacherRequest:
        """An instance step's first request: the classification (reference) or an input (chat)."""
        first_key, _ = self.instance_step_keys()
        if self.chat_instances:
            prompt, decoding = recipes.chat_input_prompt(instruction), recipes.CHAT_INPUT_DECODING
        else:
            prompt, decoding = recipes.classify_prompt(instruction), recipes.CLASSIFY_DECODING
        return TeacherRequest(key=f"{first_key}:{candidate_id}", prompt=prompt, params=dict(decoding))

    def second_instance_request(self, candidate_id: int, instruction: str, first_answer) -> TeacherRequest:
        """The instances request, given what the first answer said: is_classification (reference) or
        the parsed input (chat)."""
        _, second_key = self.instance_step_keys()
        if self.chat_instances:
            prompt, decoding = recipes.chat_output_prompt(instruction, first_answer), recipes.CHAT_OUTPUT_DECODING
        else:
            prompt, decoding = recipes.instance_prompt(instruction, first_answer), recipes.INSTANCE_DECODING
        return TeacherRequest(key=f"{second_key}:{candidate_id}", prompt=prompt,
                              params=self._decoding(decoding, self.cfg.generate.instance_max_tokens))

    async def send_instance_step(self, work: InstanceWork) -> InstanceWork:
        """Two requests per kept instruction. Reference (self-instruct): classification, then
        output-first (classification) or input-first instances. Chat (generate.instance_prompt =
        "chat"): an input for the task, then the task with that input as a chat message, whose reply
        is the output (one instance)."""
        request = self.first_instance_request(work.candidate_id, work.instruction)
        first = await self.client.complete(request, on_retry=self._count_retry)
        work.classify = (first, request.prompt)
        if not first.ok:  # the step failed; a rerun retries it whole
            return work
        if self.chat_instances:
            work.chat_input = first_answer = recipes.parse_chat_input(first.text or "")
        else:
            work.is_classification = first_answer = recipes.parse_classify(first.text or "")
        request = self.second_instance_request(work.candidate_id, work.instruction, first_answer)
        work.instances = (await self.client.complete(request, on_retry=self._count_retry), request.prompt)
        return work

    # --- handling a result, in arrival order (the recorded order) ---------------------------------
    def _stop_if_fatal(self, result: TeacherResult) -> None:
        if result.fatal:
            raise GenerateFailed(f"teacher endpoint {self.client.settings.endpoint} refused the request: "
                                 f"{result.error} (not retryable: check teacher.endpoint, teacher.model and the "
                                 f"API key env var; nothing more was sent)")

    def _take_ids(self, n: int) -> list[int]:
        # ids from the sequence in blocks, one query per block; they grow in handling order
        if len(self.free_ids) < n:
            self.free_ids.extend(self.wh.next_ids(max(4096, n)))
        return [self.free_ids.popleft() for _ in range(n)]

    def _request_row(self, result: TeacherResult, purpose: str, prompt: str) -> list:
        return queries.teacher_request_row(result, "generate", purpose, prompt)

    def handle_instructions(self, work: InstructionWork) -> list[tuple[int, str]]:
        """Judge the parsed candidates; returns the newly kept (id, instruction) for the instance step."""
        result, request = work.result, work.request
        self._stop_if_fatal(result)
        self.tally.add_result(result)
        self.instructions_handled += 1
        generate_cfg = self.cfg.generate
        parsed: list[recipes.ParsedInstruction] = []
        if result.ok and result.text is not None:
            parse = recipes.parse_self_instruct if generate_cfg.recipe == "self-instruct" else recipes.parse_alpaca
            parsed = parse(result.text, work.n_demos, result.finish_reason, truncation=truncation_policy(self.cfg))
        ids = self._take_ids(len(parsed))  # pool ids must exist before the filter sees the candidate
        kept: list[tuple[int, str]] = []
        for position, (item, cid) in enumerate(zip(parsed, ids)):
            verdict, reason, heuristic, rouge = judge_candidate(self.cfg, self.near_dup, item.instruction,
                                                                item.truncated, lambda: candidate_pool_id(cid))
            self.batch.candidates.append((cid, queries.CandidateRow(
                request_key=request.key, position=position, instruction=item.instruction,
                input=item.input or None, output=item.output or None, heuristic_reason=heuristic,
                verdict=verdict, reason=reason,
                max_score=rouge.max_score if rouge else None, most_similar=rouge.most_similar_id if rouge else None,
                top_k=[list(t) for t in rouge.top_k] if rouge else None, mean_score=rouge.mean_score if rouge else None)))
            self.tally.candidates += 1
            if verdict == "kept":
                kept.append((cid, item.instruction))
                self.tally.kept += 1
                self.machine_demos.append(recipes.Demo(instruction=item.instruction, input=item.input,
                                                       output=item.output))
                if generate_cfg.recipe == "alpaca" and item.output:  # alpaca writes the instance with the instruction
                    self.batch.instances.append((cid, 0, item.input or "", item.output))
            else:
                self.tally.rejected[reason] += 1
        self.batch.requests.append(self._request_row(result, "instructions", request.prompt))
        if work.replaces:
            self.batch.replaced_keys.append(request.key)
        return kept if generate_cfg.recipe == "self-instruct" else []

    def handle_instance_step(self, work: InstanceWork) -> None:
        steps = [work.classify] + ([work.instances] if work.instances else [])
        for result, _ in steps:
            self._stop_if_fatal(result)
        step_keys = self.instance_step_keys()
        for (result, prompt), purpose in zip(steps, step_keys):
            self.tally.add_result(result)
            self.batch.requests.append(self._request_row(result, purpose, prompt))
        if work.replaces:
            self.batch.replaced_keys += [f"{key}:{work.candidate_id}" for key in step_keys]
        if work.instances is None:
            return
        inst = work.instances[0]
        generate_cfg = self.cfg.generate
        if self.chat_instances:
            if inst.ok and inst.text is not None:
                pairs = recipes.clean_instances([(work.chat_input, recipes.parse_chat_output(inst.text, inst.finish_reason))])
                self.batch.instances += [(work.candidate_id, i, inp, out) for i, (inp, out) in enumerate(pairs)]
            return
        self.batch.classifications.append((work.candidate_id, work.is_classification))
        if inst.ok and inst.text is not None:
            pairs = recipes.clean_instances(recipes.parse_instances(inst.text, work.is_classification,
                                                                    generate_cfg.max_instances), generate_cfg.max_instances)
            self.batch.instances += [(work.candidate_id, i, inp, out) for i, (inp, out) in enumerate(pairs)]

    # --- group commits ------------------------------------------------------------------------------
    def _take_batch(self) -> queries.GenerateBatch:
        batch, self.batch = self.batch, queries.GenerateBatch()
        self.batch_started = time.monotonic()
        self.tally.commits += 1 if len(batch) else 0
        return batch

    async def flush(self) -> None:
        """Commit everything handled so far (after the commit already running, if any)."""
        if self.committing is not None:
            await self.committing
            self.committing = None
        if len(self.batch):
            queries.commit_generate_batch(self.wh, self._take_batch())

    def _commit_if_due(self) -> None:
        """Start a group commit in a worker thread when the batch is full or old enough; DuckDB
        releases the GIL while it writes, so requests keep flowing. One commit at a time, in order."""
        generate_cfg = self.cfg.generate
        if self.committing is not None:
            if not self.committing.done():
                return
            self.committing.result()  # a failed write stops the run
            self.committing = None
        if len(self.batch) >= generate_cfg.commit_every or \
                (len(self.batch) and time.monotonic() - self.batch_started >= generate_cfg.commit_ms / 1000):
            self.committing = asyncio.ensure_future(
                asyncio.to_thread(queries.commit_generate_batch, self.wh, self._take_batch()))

    # --- the scheduler ------------------------------------------------------------------------------
    def _failing(self) -> bool:
        """Most of this run's requests failed (and enough of them to tell)."""
        tally, generate_cfg = self.tally, self.cfg.generate
        return (tally.requests >= max(8, self.client.settings.max_concurrency)
                and tally.failed > generate_cfg.max_failed_fraction * tally.requests)

    def raise_if_mostly_failed(self, sent: str, rerun: str, per: str = "") -> None:
        """A run whose failures exceed generate.max_failed_fraction fails (its failures are stored)."""
        generate_cfg = self.cfg.generate
        if self.tally.failed > generate_cfg.max_failed_fraction * self.tally.requests:
            raise GenerateFailed(
                f"generate: {self.tally.failed} of {self.tally.requests} {sent} failed this run (more than "
                f"generate.max_failed_fraction = {generate_cfg.max_failed_fraction:g}); the failures are stored (see "
                f"teacher_requests.error) and a rerun {rerun}, up to generate.key_attempts = "
                f"{generate_cfg.key_attempts}{per}")

    def _want_instructions(self) -> bool:
        """More instruction requests are needed: the in-flight ones, at this run's yield so far, would
        not reach the target (so the run does not overshoot by a whole window of requests)."""
        target = self.cfg.generate.target_kept
        if self.tally.kept >= target:
            return False
        kept_per_request = (self.tally.kept - self.kept_at_start) / max(self.instructions_handled, 1)
        return self.tally.kept + kept_per_request * self.instructions_in_flight < target

    async def run(self) -> dict:
        generate_cfg = self.cfg.generate
        started = time.monotonic()
        steps: deque[InstanceWork] = deque()
        if generate_cfg.instances and generate_cfg.recipe == "self-instruct":  # a killed run's unfinished or failed instance steps
            steps.extend(InstanceWork(r["candidate_id"], r["instruction"], bool(r["stored"]))
                         for r in queries.instance_steps_to_do(self.wh, self.instance_step_keys())
                         if not r["stored"] or 1 + r["replaced"] < generate_cfg.key_attempts)
        states = queries.instruction_key_states(self.wh)
        failed_keys = {row["request_key"] for row in states if row["failed"]}
        todo, next_new = instruction_keys_to_send(states, generate_cfg.max_requests, generate_cfg.key_attempts)
        keys = deque(todo)
        in_flight: set[asyncio.Future] = set()

        def next_work():
            nonlocal next_new
            if self._failing():  # stop sending into an endpoint that fails most requests
                return None
            if steps:
                return self.send_instance_step(steps.popleft())
            if not self._want_instructions():
                return None
            if keys:
                index = keys.popleft()
            elif next_new < generate_cfg.max_requests:
                index, next_new = next_new, next_new + 1
            else:
                return None
            self.instructions_in_flight += 1
            return self.send_instructions(InstructionWork(index, instruction_key(index) in failed_keys))

        try:
            while True:
                # as many units of work as the client lets on the wire (one in backoff keeps its place)
                while len(in_flight) < max(1, int(self.client.limit)) and (work := next_work()) is not None:
                    in_flight.add(asyncio.ensure_future(work))
                if not in_flight:
                    break
                wait_s = max(0.01, generate_cfg.commit_ms / 1000 - (time.monotonic() - self.batch_started))
                done, in_flight = await asyncio.wait(in_flight, timeout=wait_s if len(self.batch) else None,
                                                     return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    work = task.result()
                    if isinstance(work, InstructionWork):
                        self.instructions_in_flight -= 1
                        if generate_cfg.instances:
                            steps.extend(InstanceWork(cid, text, False) for cid, text in self.handle_instructions(work))
                        else:
                            self.handle_instructions(work)
                    else:
                        self.handle_instance_step(work)
                self._commit_if_due()
                self._update(force=False)
        except (GenerateFailed, asyncio.CancelledError, KeyboardInterrupt):
            for task in in_flight:
                task.cancel()
            await asyncio.shield(self.flush())  # what was handled is kept when we stop on a refused endpoint or Ctrl-C
            raise
        finally:
            for task in in_flight:
                task.cancel()
            self._update(force=True)
        await self.flush()
        self.raise_if_mostly_failed(f"teacher requests to {self.client.settings.endpoint}", "retries them",
                                    " per key")
        return {"seconds": time.monotonic() - started, "target_reached": self.tally.kept >= generate_cfg.target_kept}

    def _update(self, force: bool) -> None:
        now = time.monotonic()
        if force or now - self._last_update >= 0.1:  # a rich refresh per result costs more than the result
            self._last_update = now
            self.tally.in_flight, self.tally.limit = self.client.in_flight, int(self.client.limit)
            self.tally.throttled = self.client.throttled
            self.tally.cpu_s = time.process_time() - self.tally.cpu_started
            self.on_update(self.tally)

    def _count_retry(self, request: TeacherRequest, attempt: int, error: str) -> None:
        self.tally.retries += 1
