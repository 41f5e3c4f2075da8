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

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

from openai.types import Completion
from openai.types.chat import ChatCompletion

from instructflow.tasks import recipes
from instructflow.tasks.batch import (TERMINAL, BatchAPI, BatchAPIError, batch_line, batch_price_table,
                                      encode_jsonl, keys_free_for_batch, line_outcomes)
from instructflow.tasks.config import Config
from instructflow.tasks.generate import (GenerateFailed, Generator, InstanceWork, InstructionWork, Tally,
                                         instruction_keys_to_send)
from instructflow.tasks.teacher import TeacherClient, TeacherRequest, TeacherResult
from instructflow.warehouse import queries
from instructflow.warehouse.store import Warehouse

logger = logging.getLogger(__name__)
STAGE = "generate"


@dataclass
class BatchTally(Tally):
    batch: str = ""  # the batch being waited on: id, status, counts, elapsed
    batches_created: int = 0

    def line(self, target: int) -> str:
        return (f"kept {self.kept}/{target} · {self.batch or 'no batch open'} · stored {self.requests} "
                f"(failed {self.failed}) · cand {self.candidates} · "
                f"tok {self.prompt_tokens}+{self.completion_tokens} · ${self.cost_usd:.4f}")


def check_batch_endpoint(cfg: Config) -> None:
    if cfg.teacher.mode == "batch" and cfg.teacher.endpoint == "embedded":
        raise ValueError("teacher.mode = 'batch' needs an endpoint that speaks the Batch API (e.g. "
                         "https://api.openai.com/v1); the embedded transformers serve does not: set teacher.endpoint "
                         "or teacher.mode = 'sync'")


class BatchGenerator(Generator):
    def __init__(self, wh: Warehouse, cfg: Config, client: TeacherClient,
                 on_update: Callable[[Tally], None] | None = None):
        super().__init__(wh, cfg, client, on_update)
        self.tally = BatchTally(kept=self.kept_at_start)
        s = client.settings
        # results are built by the client's own code, priced at the batch rates
        self.results = TeacherClient(dataclasses.replace(
            s, prices=batch_price_table(cfg.teacher.prices, cfg.teacher.batch_prices)))
        self.api = BatchAPI(s)
        self.polled: list[str] = []  # batch ids, in the order they were waited on

    # --- one answered line -> the TeacherResult a synchronous request would have produced ---------
    def result_of(self, state: dict, request: TeacherRequest) -> TeacherResult:
        body = state["response"]
        response = None
        if body is not None:
            model = ChatCompletion if self.client.settings.api == "chat" else Completion
            response = model.construct(**body)
        # a batch line has no round trip of its own: latency 0, one attempt
        return self.results.result_from_response(request, dict(request.params), response, state["error"], 1, 0.0)

    # --- the loop -----------------------------------------------------------------------------------
    async def run(self) -> dict:
        generate_cfg, started = self.cfg.generate, time.monotonic()
        try:
            while True:
                self.finish_open_batches()
                self.store_collected()
                if self._failing():
                    break
                requests = self.next_requests()
                if not requests:
                    break
                self.submit(requests)
        except BatchAPIError as exc:
            raise GenerateFailed(f"teacher endpoint {self.client.settings.base_url} refused a Batch API call: {exc} "
                                 f"(check teacher.endpoint and the API key env var {self.cfg.teacher.api_key_env}; "
                                 f"no batch was created for the keys not yet sent)") from None
        finally:
            self.api.close()
            self.tally.batch = ""
            self._update(force=True)
        self.raise_if_mostly_failed("batch lines", "resubmits them")
        return {"seconds": time.monotonic() - started, "target_reached": self.tally.kept >= generate_cfg.target_kept}

    # --- batches: open -> polled -> collected ------------------------------------------------------
    def finish_open_batches(self) -> None:
        for row in queries.open_batches(self.wh, STAGE):
            batch_id = row["batch_id"]
            if row["endpoint"] != self.client.settings.base_url:
                raise GenerateFailed(f"batch {batch_id or row['input_file_id']} is open at {row['endpoint']}, not at "
                                     f"teacher.endpoint {self.client.settings.base_url}: point teacher.endpoint back "
                                     f"at it so it is collected, or `instructflow batches --cancel {batch_id}`")
            if batch_id is None:  # killed between upload and create: adopt the batch if it was created
                found = self.api.find_by_input(row["input_file_id"])
                batch_id = found.id if found is not None else self._create(row["input_file_id"])
                queries.set_batch_state(self.wh, row["input_file_id"], batch_id,
                                        found.status if found is not None else "validating", None, None)
            self.wait(row["input_file_id"], batch_id)

    def _create(self, input_file_id: str) -> str:
        batch = self.api.create(input_file_id, metadata={"instructflow_stage": STAGE})
        queries.set_batch_state(self.wh, input_file_id, batch.id, batch.status, None, None)
        self.tally.batches_created += 1
        logger.info("created batch %s from %s", batch.id, input_file_id)
        return batch.id

    def wait(self, input_file_id: str, batch_id: str) -> None:
        started = time.monotonic()
        self.polled.append(batch_id)
        while True:
            batch = self.api.retrieve(batch_id)
            counts = batch.request_counts
            done, failed, total = (counts.completed, counts.failed, counts.total) if counts else (0, 0, 0)
            queries.set_batch_state(self.wh, input_file_id, batch_id, batch.status, done, failed)
            self.tally.batch = (f"batch {batch_id} {batch.status}: {done}/{total} done, {failed} failed, "
                                f"{time.monotonic() - started:.0f}s")
            self._update(force=True)
            if batch.status in TERMINAL:
                break
            time.sleep(self.cfg.teacher.batch_poll_s)
        self.collect(input_file_id, batch)

    def collect(self, input_file_id: str, batch) -> None:
        output = self.api.content(batch.output_file_id) if batch.output_file_id else ""
        errors = self.api.content(batch.error_file_id) if batch.error_file_id else ""
        batch_error = "; ".join(f"{e.code}: {e.message}" for e in batch.errors.data) \
            if batch.errors is not None and batch.errors.data else None
        lines = line_outcomes(queries.batch_request_keys(self.wh, input_file_id), output, errors, batch_error,
                              batch.status)
        queries.store_batch_lines(self.wh, input_file_id, batch.status, batch.output_file_id, batch.error_file_id,
                                  batch_error, lines)
        missing = sum(1 for *_, m in lines if m)
        logger.info("batch %s %s: %d lines, %d not run", batch.id, batch.status, len(lines), missing)
        if batch.status == "failed":
            raise GenerateFailed(f"batch {batch.id} at {self.client.settings.base_url} failed: "
                                 f"{batch_error or 'no reason given'} (a rerun resubmits its keys)")

    # --- store what collected batches answered, exactly as synchronous results are stored ----------
    def store_collected(self) -> None:
        states = queries.batch_key_states(self.wh, STAGE)
        answered = {k: s for k, s in states.items()
                    if s["collected_at"] is not None and not s["stored"] and not s["missing"]}
        if not answered:
            return
        stored_instruction_keys = {r["request_key"] for r in queries.instruction_key_states(self.wh)}
        for key in sorted(k for k, s in answered.items() if s["purpose"] == "instructions"):
            state = answered[key]
            request = TeacherRequest(key=key, prompt=state["prompt"], params=state["params"])
            self.handle_instructions(InstructionWork(
                index=int(key.split(":")[1]), replaces=key in stored_instruction_keys, request=request,
                n_demos=state["meta"]["n_demos"], result=self.result_of(state, request)))
        for step in queries.instance_steps_to_do(self.wh):
            cid = step["candidate_id"]
            clf, inst = answered.get(f"classify:{cid}"), answered.get(f"instances:{cid}")
            if clf is None or (clf["error"] is None and inst is None):
                continue  # nothing answered, or classified and its instances are not answered yet
            clf_request = TeacherRequest(key=f"classify:{cid}", prompt=clf["prompt"], params=clf["params"])
            work = InstanceWork(cid, step["instruction"], bool(step["stored"]),
                                classify=(self.result_of(clf, clf_request), clf["prompt"]))
            if clf["error"] is None:
                inst_request = TeacherRequest(key=f"instances:{cid}", prompt=inst["prompt"], params=inst["params"])
                work.instances = (self.result_of(inst, inst_request), inst["prompt"])
                work.is_classification = bool(inst["meta"]["is_classification"])
            self.handle_instance_step(work)
        if len(self.batch):
            queries.commit_generate_batch(self.wh, self._take_batch())

    # --- what the next batch holds ---------------------------------------------------------------
    def next_requests(self) -> list[tuple[TeacherRequest, str, dict]]:
        generate_cfg = self.cfg.generate
        states = queries.batch_key_states(self.wh, STAGE)
        out: list[tuple[TeacherRequest, str, dict]] = []
        if generate_cfg.instances and generate_cfg.recipe == "self-instruct":
            for step in queries.instance_steps_to_do(self.wh):
                if step["stored"] and 1 + step["replaced"] >= generate_cfg.key_attempts:
                    continue
                cid, instruction = step["candidate_id"], step["instruction"]
                clf = states.get(f"classify:{cid}")
                if clf is not None and clf["response"] is not None and not clf["stored"]:
                    request = TeacherRequest(key=f"classify:{cid}", prompt=clf["prompt"], params=clf["params"])
                    is_classification = recipes.parse_classify(self.result_of(clf, request).text or "")
                    out.append((TeacherRequest(
                        key=f"instances:{cid}", prompt=recipes.instance_prompt(instruction, is_classification),
                        params=self._decoding(recipes.INSTANCE_DECODING, generate_cfg.instance_max_tokens)),
                        "instances", {"candidate_id": cid, "is_classification": is_classification}))
                else:
                    out.append((TeacherRequest(key=f"classify:{cid}", prompt=recipes.classify_prompt(instruction),
                                               params=dict(recipes.CLASSIFY_DECODING)), "classify", {"candidate_id": cid}))
        if not out and self.tally.kept < generate_cfg.target_kept:
            todo, frontier = instruction_keys_to_send(queries.instruction_key_states(self.wh), generate_cfg.max_requests,
                                                      generate_cfg.key_attempts)
            for index in (todo + list(range(frontier, generate_cfg.max_requests)))[: self._round_size()]:
                request, n_demos = self.instruction_request(index)
                out.append((request, "instructions", {"n_demos": n_demos}))
        free, held = keys_free_for_batch([r.key for r, _, _ in out], states)
        if held:  # the plan never asks for these (open batches are finished first): a bug, not a reason to pay twice
            raise RuntimeError(f"generate (batch): keys {held[:3]} are held by a batch; refusing to send them again")
        exhausted = [k for k in free if k in states and states[k]["missing"] and states[k]["batches"] >= generate_cfg.key_attempts]
        if exhausted:
            raise GenerateFailed(f"generate: {len(exhausted)} request keys (e.g. {exhausted[0]}) were in "
                                 f"{generate_cfg.key_attempts} batches that ended without running them (last: "
                                 f"{states[exhausted[0]]['error']}); see `instructflow batches`")
        return out

    def _round_size(self) -> int:
        """batch_size, or fewer once this run's yield says fewer prompts reach the target."""
        generate_cfg = self.cfg.generate
        kept_per_request = (self.tally.kept - self.kept_at_start) / max(self.instructions_handled, 1)
        if kept_per_request <= 0:
            return generate_cfg.batch_size
        return min(generate_cfg.batch_size, max(1, math.ceil((generate_cfg.target_kept - self.tally.kept) / kept_per_request)))

    def submit(self, requests: list[tuple[TeacherRequest, str, dict]]) -> None:
        s = self.client.settings
        input_file_id = self.api.upload(encode_jsonl(batch_line(request, s) for request, _, _ in requests))
        queries.record_batch_input(self.wh, input_file_id, STAGE, s.base_url,
                                   [(r.key, purpose, r.prompt, dict(r.params), meta) for r, purpose, meta in requests])
        self._create(input_file_id)
