"""Stage 3, sft: kept instructions x instances (plus the seeds' own instances) -> TRL SFTTrainer
on the Llama actor. The checkpoint is registered with the dataset's content hash."""
from __future__ import annotations

import shutil
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE

from instructflow.flows.common import StageContext, publish_artifacts, stable_hash, stage_context
from instructflow.flows.stages import StageSpec
from instructflow.flows.teacher import local_model_dir
from instructflow.tasks.config import Config, accelerate_config_file
from instructflow.tasks.sft_data import InstructionExample, dataset_hash, split_train_eval, to_prompt_completion
from instructflow.warehouse import queries
from instructflow.warehouse.store import Warehouse


def build_examples(cfg: Config, wh: Warehouse) -> list[InstructionExample]:
    examples = [InstructionExample(r["instruction"], r["input"], r["output"], "generated")
                for r in queries.kept_instances(wh)]
    if cfg.sft.include_seed_instances:
        for seed in queries.seed_rows(wh):
            examples += [InstructionExample(seed["instruction"], i["input"], i["output"], "seed")
                         for i in seed["instances"]]
    return examples


def current_dataset(cfg: Config, wh: Warehouse) -> tuple[str, list, list]:
    """(dataset hash, train, eval) exactly as SFT would train now; later stages read the same split."""
    examples = build_examples(cfg, wh)
    train, held_out = split_train_eval(examples, cfg.sft.eval_fraction, cfg.sft.seed)
    return dataset_hash(examples), train, held_out


@task(name="train-sft", cache_policy=NONE)
def train(ctx: StageContext, train_rows: list[dict], eval_rows: list[dict], base: Path, output_dir: Path) -> dict:
    from instructflow.models.sft import train_sft

    if ctx.cfg.sft.launcher == "inprocess":
        return train_sft(train_rows, eval_rows, ctx.cfg.sft, base, output_dir, on_step=ctx.step)
    return launch_with_accelerate(ctx, train_rows, eval_rows, base, output_dir)


def launch_with_accelerate(ctx: StageContext, train_rows: list[dict], eval_rows: list[dict], base: Path,
                           output_dir: Path) -> dict:
    """`accelerate launch -m instructflow.models.sft --job job.json`: the same recipe on N processes/GPUs."""
    import json
    import re
    import subprocess
    import sys

    from instructflow.models.sft import write_job

    sft = ctx.cfg.sft
    output_dir.mkdir(parents=True, exist_ok=True)
    job = write_job(output_dir / "job.json", train_rows, eval_rows, sft, base, output_dir)
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(accelerate_config_file(sft.accelerate_config))]  # checked at config load
    if sft.num_processes:
        command += ["--num_processes", str(sft.num_processes)]
    command += ["-m", "instructflow.models.sft", "--job", str(job)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        (output_dir / "launch.log").write_text(done.stdout + done.stderr)
        # the first rank's own exception line, not the launcher's ChildFailedError banner
        raised = [line.strip() for line in done.stderr.splitlines()
                  if re.match(r"^\w+(\.\w+)*(Error|Exception): ", line.strip()) and "ChildFailedError" not in line]
        why = raised[0] if raised else " | ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"accelerate launch failed ({done.returncode}): {why} "
                           f"(full log: {output_dir / 'launch.log'})")
    metrics = json.loads((output_dir / "final" / "metrics.json").read_text())
    # per-step curves: the trainer's own log, recorded after the fact
    states = sorted(output_dir.glob("checkpoints/checkpoint-*/trainer_state.json"),
                    key=lambda p: int(p.parent.name.split("-")[1]))
    for entry in json.loads(states[-1].read_text())["log_history"] if states else []:
        ctx.step(int(entry.get("step", 0)), {k: v for k, v in entry.items() if k in ("loss", "eval_loss", "learning_rate")})
    return metrics


@flow(name="sft", log_prints=True)
def sft_flow(profile: str = "cpu", home: str | None = None, config: str | None = None,
             run_id: str | None = None, force: bool = False) -> dict:
    from transformers import AutoTokenizer

    with stage_context("sft", profile, home, config, run_id, force) as ctx:
        data_hash, train_examples, eval_examples = current_dataset(ctx.cfg, ctx.wh)
        if not train_examples:
            raise ValueError("sft: no kept instructions or seed tasks in the warehouse yet: run "
                             "`instructflow stage generate` (or `instructflow run`) first")
        queries.store_sft_examples(ctx.wh, data_hash, [("train", e) for e in train_examples] +
                                   [("eval", e) for e in eval_examples])
        base = local_model_dir(ctx.cfg.sft.base_model)
        tokenizer = AutoTokenizer.from_pretrained(base)
        style = ctx.cfg.sft.style
        train_rows = [to_prompt_completion(e, style, tokenizer) for e in train_examples]
        eval_rows = [to_prompt_completion(e, style, tokenizer) for e in eval_examples]
        # same data + same config -> same folder, so an interrupted run resumes from its checkpoint
        output_dir = ctx.out_dir / f"run-{stable_hash([data_hash, ctx.inputs['config'], str(base)])}"
        if ctx.force and output_dir.exists():
            shutil.rmtree(output_dir)
        result = train(ctx, train_rows, eval_rows, base, output_dir)
        metrics = {"train_examples": len(train_rows), "eval_examples": len(eval_rows),
                   "eval_loss_before": result["eval_loss_before"], "eval_loss_after": result["eval_loss_after"],
                   "train_loss_last": result["train_loss_last"], "checkpoint": str(result["checkpoint"]),
                   "dataset_hash": data_hash, "tokens_per_s": result["tokens_per_s"],
                   "tokens_seen": result.get("tokens_seen"), "wall_s": result.get("wall_s"),
                   "resumed_from": result.get("resumed_from"), "base_model": str(base)}
        ctx.wh.register_checkpoint(ctx.stage_run_id, "sft", str(result["checkpoint"]), str(base), data_hash,
                                   {"sft": vars(ctx.cfg.sft)}, metrics)
        ctx.finish(metrics, output_hash=stable_hash([str(result["checkpoint"]), data_hash, ctx.inputs["config"]]))
        samples = [{"split": "eval", "prompt": r["prompt"][-300:], "completion": r["completion"][:300]}
                   for r in eval_rows[:20]]
        publish_artifacts(ctx, "sft", metrics, samples=samples, plots={"loss": result.get("plot")})
    return metrics


def sft_data_inputs(cfg: Config, wh: Warehouse) -> dict:
    return {"dataset": current_dataset(cfg, wh)[0]}


def sft_outputs_exist(cfg: Config, wh: Warehouse) -> bool:
    from pathlib import Path

    last = wh.latest_checkpoint("sft")
    return last is not None and (Path(last["path"]) / "config.json").exists()


STAGE = StageSpec(
    name="sft", flow=sft_flow, config_sections=("sft",), upstream=("filter",), data_inputs=sft_data_inputs,
    outputs_exist=sft_outputs_exist, summary="supervised fine-tuning of the Llama actor (TRL SFTTrainer)",
)
