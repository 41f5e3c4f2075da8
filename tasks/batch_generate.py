"""The generate stage in batch mode (`teacher.mode = "batch"`): the same units of work, keys, parsing,
judging and storage as the streaming `Generator` (this is a subclass: results are handled by its
`handle_instructions` / `handle_instance_step` and written by `commit_generate_batch`), sent as
Batch API jobs instead of synchronous requests.

Self-instruct is iterative, so a run is a sequence of rounds, each one batch:
  1. up to `generate.batch_size` instruction prompts (drawn from the pool as it is then);
  2. the classify requests of the instructions that round kept;
  3. their instance requests (the prompt depends on the classification).
The alpaca recipe has no instance step: one batch holds all its prompts (up to batch_size).
Every loop first polls the batches still open in the warehouse (a killed run's too) and stores
what they answered, so a restart never creates a second batch for keys a batch holds.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

from instructflow.tasks import recipes
from instructflow.tasks.batch import MAX_LINES, BatchAPIError, BatchFailed, BatchJobs
from instructflow.tasks.config import Config
from instructflow.tasks.generate import (GenerateFailed, Generator, InstanceWork, InstructionWork, Tally,
                                         instruction_keys_to_send)
from instructflow.tasks.teacher import TeacherClient, TeacherRequest
from instructflow.warehouse import queries
from instructflow.warehouse.store import Warehouse

logger = logging.getLogger(__name__)
STAGE = "generate"


@dataclass
class BatchTally(Tally):
    batch: str = ""  # the batch being waited on: id, status, counts, elapsed

    def line(self, target: int) -> str:
        return (f"kept {self.kept}/{target} · {self.batch or 'no batch open'} · stored {self.requests} "
                f"(failed {self.failed}) · cand {self.candidates} · "
                f"tok {self.prompt_tokens}+{self.completion_tokens} · ${self.cost_usd:.4f}")


class BatchGenerator(Generator):
    def __init__(self, wh: Warehouse, cfg: Config, client: TeacherClient,
                 on_update: Callable[[Tally], None] | None = None):
        super().__init__(wh, cfg, client, on_update)
        self.tally = BatchTally(kept=self.kept_at_start)
        self.jobs = BatchJobs(wh, STAGE, client.settings, cfg.teacher.batch_prices, cfg.teacher.batch_poll_s,
                              on_status=self._show_batch)
        # chat instance prompts need the input before the output is asked for: one batch per round
        # cannot, so batch mode keeps the reference prompts
        self.chat_instances = False

    def _show_batch(self, line: str) -> None:
        self.tally.batch = line
        self._update(force=True)

    # --- the loop -----------------------------------------------------------------------------------
    async def run(self) -> dict:
        generate_cfg, started = self.cfg.generate, time.monotonic()
        try:
            while True:
                self.jobs.finish_open()
                self.store_collected()
                if self._failing():
                    break
                requests = self.next_requests()
                if not requests:
                    break
                self.jobs.submit(requests)
        except BatchAPIError as exc:
            raise GenerateFailed(f"teacher endpoint {self.client.settings.endpoint} refused a Batch API call: {exc} "
                                 f"(check teacher.endpoint and the API key env var {self.cfg.teacher.api_key_env}; "
                                 f"no batch was created for the keys not yet sent)") from None
        except BatchFailed as exc:
            raise GenerateFailed(f"generate: {exc}") from None
        finally:
            self.jobs.close()
            self._show_batch("")
        self.raise_if_mostly_failed("batch lines", "resubmits them")
        return {"seconds": time.monotonic() - started, "target_reached": self.tally.kept >= generate_cfg.target_kept}

    # --- store what collected batches answered, exactly as synchronous results are stored ----------
    def store_collected(self) -> None:
        answered = self.jobs.answered()
        if not answered:
            return
        stored_instruction_keys = {r["request_key"] for r in queries.instruction_key_states(self.wh)}
        for key in sorted(k for k, s in answered.items() if s["purpose"] == "instructions"):
            state = answered[key]
            self.handle_instructions(InstructionWork(
                index=int(key.split(":")[1]), replaces=key in stored_instruction_keys,
                request=self.jobs.request_of(state), n_demos=state["meta"]["n_demos"],
                result=self.jobs.result_of(state)))
        for step in queries.instance_steps_to_do(self.wh):
            cid = step["candidate_id"]
            clf, inst = answered.get(f"classify:{cid}"), answered.get(f"instances:{cid}")
            if clf is None or (clf["error"] is None and inst is None):
                continue  # nothing answered, or classified and its instances are not answered yet
            work = InstanceWork(cid, step["instruction"], bool(step["stored"]),
                                classify=(self.jobs.result_of(clf), clf["prompt"]))
            if clf["error"] is None:
                work.instances = (self.jobs.result_of(inst), inst["prompt"])
                work.is_classification = bool(inst["meta"]["is_classification"])
            self.handle_instance_step(work)
        if len(self.batch):
            queries.commit_generate_batch(self.wh, self._take_batch())

    # --- what the next batch holds ---------------------------------------------------------------
    def next_requests(self) -> list[tuple[TeacherRequest, str, dict]]:
        generate_cfg = self.cfg.generate
        states = self.jobs.states()
        out: list[tuple[TeacherRequest, str, dict]] = []
        if generate_cfg.instances and generate_cfg.recipe == "self-instruct":
            for step in queries.instance_steps_to_do(self.wh):
                if step["stored"] and 1 + step["replaced"] >= generate_cfg.key_attempts:
                    continue
                cid, instruction = step["candidate_id"], step["instruction"]
                clf = states.get(f"classify:{cid}")
                if clf is not None and clf["response"] is not None and not clf["stored"]:
                    is_classification = recipes.parse_classify(self.jobs.result_of(clf).text or "")
                    out.append((self.second_instance_request(cid, instruction, is_classification), "instances",
                                {"candidate_id": cid, "is_classification": is_classification}))
                else:
                    out.append((self.first_instance_request(cid, instruction), "classify", {"candidate_id": cid}))
        if not out and self.tally.kept < generate_cfg.target_kept:
            todo, frontier = instruction_keys_to_send(queries.instruction_key_states(self.wh), generate_cfg.max_requests,
                                                      generate_cfg.key_attempts)
            for index in (todo + list(range(frontier, generate_cfg.max_requests)))[: self._round_size()]:
                request, n_demos = self.instruction_request(index)
                out.append((request, "instructions", {"n_demos": n_demos}))
        self.jobs.check_sendable([r.key for r, _, _ in out], states, generate_cfg.key_attempts, "generate")
        return out[:MAX_LINES]

    def _round_size(self) -> int:
        """batch_size, or fewer once this run's yield says fewer prompts reach the target."""
        generate_cfg = self.cfg.generate
        kept_per_request = (self.tally.kept - self.kept_at_start) / max(self.instructions_handled, 1)
        if kept_per_request <= 0:
            return generate_cfg.batch_size
        return min(generate_cfg.batch_size, MAX_LINES, max(1, math.ceil((generate_cfg.target_kept - self.tally.kept) / kept_per_request)))
