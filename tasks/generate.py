"""The generate loop: rounds of concurrent teacher requests until enough instructions are kept.

Every request has a deterministic key (`instructions:000042`, `classify:<candidate>`,
`instances:<candidate>`). A request's row and everything parsed from it are written in one
transaction the moment it finishes, so a SIGKILL loses only in-flight requests, and a rerun starts
from the stored keys: it never resends a stored request and never duplicates a row.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
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


@dataclass
class Tally:
    """Live numbers for the progress bar and the stage metrics."""
    requests: int = 0
    failed: int = 0
    retries: int = 0
    candidates: int = 0
    kept: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    rejected: Counter = field(default_factory=Counter)

    def add_result(self, result: TeacherResult) -> None:
        self.requests += 1
        self.failed += 0 if result.ok else 1
        self.prompt_tokens += result.prompt_tokens
        self.completion_tokens += result.completion_tokens
        self.cost_usd += result.cost_usd

    def line(self, target: int) -> str:
        top = ", ".join(f"{k}={v}" for k, v in self.rejected.most_common(4)) or "none"
        return (f"kept {self.kept}/{target} · req {self.requests} (failed {self.failed}, retries {self.retries}) · "
                f"cand {self.candidates} · rejects: {top} · tok {self.prompt_tokens}+{self.completion_tokens} · "
                f"${self.cost_usd:.4f}")


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
        # The pool machine demonstrations come from is the deduplicated kept set, as in self-instruct.
        self.near_dup = build_filter(cfg, self.seeds)
        self.machine_demos: list[recipes.Demo] = []
        for row in queries.kept_candidates(wh):
            self.near_dup.add(candidate_pool_id(row["candidate_id"]), row["instruction"])
            self.machine_demos.append(recipes.Demo(instruction=row["instruction"]))
        self.tally.kept = len(self.machine_demos)

    # --- prompts --------------------------------------------------------------------------------
    def _decoding(self, base: dict, max_tokens: int) -> dict:
        params = dict(base)
        if max_tokens:
            params["max_tokens"] = max_tokens
        return params

    def instruction_request(self, index: int) -> tuple[TeacherRequest, int]:
        g = self.cfg.generate
        rng = random.Random(f"{g.seed}:{index}")  # same demos for the same request on a rerun
        if g.recipe == "self-instruct":
            demos = recipes.sample_demos(self.seed_demos, self.machine_demos, rng, n_total=g.n_demos,
                                         n_machine=g.n_machine_demos)
            prompt = recipes.self_instruct_prompt(demos)
            params = self._decoding(recipes.SELF_INSTRUCT_DECODING, g.max_tokens)
        else:
            demos = rng.sample(self.seed_demos, min(g.alpaca_demos, len(self.seed_demos)))
            prompt = recipes.alpaca_prompt(demos, n_requested=g.alpaca_instructions)
            params = self._decoding(recipes.ALPACA_DECODING, g.max_tokens)
        return TeacherRequest(key=f"instructions:{index:06d}", prompt=prompt, params=params), len(demos)

    # --- handling one finished instruction request -------------------------------------------------
    def handle_instructions(self, request: TeacherRequest, n_demos: int, result: TeacherResult) -> list[int]:
        self.tally.add_result(result)
        parsed: list[recipes.ParsedInstruction] = []
        if result.ok and result.text is not None:
            parse = recipes.parse_self_instruct if self.cfg.generate.recipe == "self-instruct" else recipes.parse_alpaca
            parsed = parse(result.text, n_demos, result.finish_reason, truncation=truncation_policy(self.cfg))
        ids = self.wh.next_ids(len(parsed))  # pool ids must exist before the filter sees the candidate
        rows, kept_ids = [], []
        for position, (item, cid) in enumerate(zip(parsed, ids)):
            verdict, reason, heuristic, rouge = judge_candidate(self.cfg, self.near_dup, item.instruction,
                                                                item.truncated, lambda: candidate_pool_id(cid))
            rows.append((cid, queries.CandidateRow(
                request_key=request.key, position=position, instruction=item.instruction,
                input=item.input or None, output=item.output or None, heuristic_reason=heuristic,
                verdict=verdict, reason=reason,
                max_score=rouge.max_score if rouge else None, most_similar=rouge.most_similar_id if rouge else None,
                top_k=[list(t) for t in rouge.top_k] if rouge else None, mean_score=rouge.mean_score if rouge else None)))
            self.tally.candidates += 1
            if verdict == "kept":
                kept_ids.append(cid)
                self.tally.kept += 1
                self.machine_demos.append(recipes.Demo(instruction=item.instruction, input=item.input,
                                                       output=item.output))
            else:
                self.tally.rejected[reason] += 1
        queries.insert_request_with_candidates(self.wh, result, "generate", request.prompt,
                                               [row for _, row in rows], ids=[cid for cid, _ in rows])
        if self.cfg.generate.recipe == "alpaca":
            # alpaca generates the instance with the instruction: store it, no extra request
            for cid, row in rows:
                if row.verdict == "kept" and row.output:
                    queries.insert_instances_result(self.wh, cid, None, [(row.input or "", row.output)], [])
        self.on_update(self.tally)
        return kept_ids if self.cfg.generate.recipe == "self-instruct" else []

    # --- instances (self-instruct): classification step, then output- or input-first --------------
    async def make_instances(self, candidate_id: int, instruction: str) -> None:
        g = self.cfg.generate
        clf_prompt = recipes.classify_prompt(instruction)
        clf = await self.client.complete(TeacherRequest(key=f"classify:{candidate_id}", prompt=clf_prompt,
                                                        params=dict(recipes.CLASSIFY_DECODING)))
        self.tally.add_result(clf)
        is_clf = recipes.parse_classify(clf.text) if clf.ok and clf.text is not None else False
        inst_prompt = recipes.instance_prompt(instruction, is_clf)
        inst = await self.client.complete(TeacherRequest(
            key=f"instances:{candidate_id}", prompt=inst_prompt,
            params=self._decoding(recipes.INSTANCE_DECODING, g.instance_max_tokens)))
        self.tally.add_result(inst)
        pairs: list[tuple[str, str]] = []
        if inst.ok and inst.text is not None:
            pairs = recipes.clean_instances(recipes.parse_instances(inst.text, is_clf, g.max_instances),
                                            g.max_instances)
        queries.insert_instances_result(self.wh, candidate_id, is_clf, pairs,
                                        [(clf, "classify", clf_prompt), (inst, "instances", inst_prompt)])
        self.on_update(self.tally)

    # --- the loop --------------------------------------------------------------------------------
    async def run(self) -> dict:
        g = self.cfg.generate
        started = time.monotonic()
        retry_hook = self._count_retry
        if g.instances and g.recipe == "self-instruct":
            pending = queries.kept_without_instances(self.wh)  # a killed run's unfinished instance step
            await asyncio.gather(*(self.make_instances(r["candidate_id"], r["instruction"]) for r in pending))
        sent = queries.count_requests(self.wh, "generate", "instructions")
        while self.tally.kept < g.target_kept and sent < g.max_requests:
            batch = [self.instruction_request(i) for i in range(sent, min(sent + g.requests_per_round, g.max_requests))]
            sent += len(batch)
            by_key = {req.key: (req, n) for req, n in batch}
            newly_kept: list[int] = []

            def on_result(result: TeacherResult) -> None:
                req, n_demos = by_key[result.key]
                newly_kept.extend(self.handle_instructions(req, n_demos, result))

            await self.client.complete_all([req for req, _ in batch], on_result=on_result, on_retry=retry_hook)
            if g.instances and newly_kept:
                texts = {r["candidate_id"]: r["instruction"] for r in queries.kept_candidates(self.wh)}
                await asyncio.gather(*(self.make_instances(cid, texts[cid]) for cid in newly_kept))
        return {"seconds": time.monotonic() - started, "target_reached": self.tally.kept >= g.target_kept}

    def _count_retry(self, request: TeacherRequest, attempt: int, error: str) -> None:
        self.tally.retries += 1
        self.on_update(self.tally)
