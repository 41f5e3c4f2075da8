"""Stage 3, sft: kept instructions x instances (plus the seeds' own instances) -> TRL SFTTrainer
on the Llama actor. The checkpoint is registered with the dataset's content hash."""
from __future__ import annotations

import shutil

from prefect import flow, task
from prefect.cache_policies import NONE

from instructflow.flows.common import StageContext, publish_artifacts, stable_hash, stage_context
from instructflow.flows.stages import StageSpec
from instructflow.flows.teacher import local_model_dir
from instructflow.tasks.config import Config
from instructflow.tasks.preferences import hashed_order
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
def train(ctx: StageContext, train_rows: list[dict], eval_rows: list[dict], base, output_dir) -> dict:
    from instructflow.models.sft import SFTSettings, train_sft

    s = ctx.cfg.sft
    settings = SFTSettings(base_model=base, output_dir=output_dir, style=s.style, max_length=s.max_length,
                           packing=s.packing, epochs=s.epochs, max_steps=s.max_steps, learning_rate=s.learning_rate,
                           batch_size=s.batch_size, grad_accum=s.grad_accum, warmup_ratio=s.warmup_ratio,
                           lora=s.lora, lora_r=s.lora_r, lora_alpha=s.lora_alpha, qlora=s.qlora,
                           gradient_checkpointing=s.gradient_checkpointing, precision=s.precision,
                           eval_steps=s.eval_steps, save_steps=s.save_steps, seed=s.seed)
    if s.launcher == "inprocess":
        return train_sft(train_rows, eval_rows, settings, on_step=ctx.step)
    return launch_with_accelerate(ctx, train_rows, eval_rows, settings)


def launch_with_accelerate(ctx: StageContext, train_rows: list[dict], eval_rows: list[dict], settings) -> dict:
    """`accelerate launch -m instructflow.models.sft --job job.json`: the same recipe on N processes/GPUs."""
    import json
    import re
    import subprocess
    import sys
    from importlib import resources
    from pathlib import Path

    from instructflow.models.sft import write_job

    s = ctx.cfg.sft
    shipped = resources.files("instructflow.models").joinpath("accelerate", f"{s.accelerate_config}.yaml")
    config_file = Path(str(shipped)) if shipped.is_file() else Path(s.accelerate_config).expanduser()
    if not config_file.is_file():
        raise FileNotFoundError(f"sft.accelerate_config: {s.accelerate_config!r} is neither a shipped config "
                                "(ddp, deepspeed_zero2, deepspeed_zero3) nor a file")
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    job = write_job(settings.output_dir / "job.json", train_rows, eval_rows, settings)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    if s.num_processes:
        command += ["--num_processes", str(s.num_processes)]
    command += ["-m", "instructflow.models.sft", "--job", str(job)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        (settings.output_dir / "launch.log").write_text(done.stdout + done.stderr)
        # the first rank's own exception line, not the launcher's ChildFailedError banner
        raised = [line.strip() for line in done.stderr.splitlines()
                  if re.match(r"^\w+(\.\w+)*(Error|Exception): ", line.strip()) and "ChildFailedError" not in line]
        why = raised[0] if raised else " | ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"accelerate launch failed ({done.returncode}): {why} "
                           f"(full log: {settings.output_dir / 'launch.log'})")
    metrics = json.loads((settings.output_dir / "final" / "metrics.json").read_text())
    # per-step curves: the trainer's own log, recorded after the fact
    states = sorted(settings.output_dir.glob("checkpoints/checkpoint-*/trainer_state.json"),
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


def heldout_prompts(cfg: Config, wh: Warehouse, source: str, n: int, seed: int, skip: int = 0) -> list[tuple[str, str]]:
    """(instruction text for a judge, prompt formatted as the policy saw it in SFT) for n prompts from
    the last SFT checkpoint's held-out split ("eval") or all of it ("all"), in a seeded order.
    `skip` lets evaluate take prompts after those PPO trained on; it wraps around when too few."""
    from transformers import AutoTokenizer

    checkpoint = wh.latest_checkpoint("sft")
    if checkpoint is None:
        raise ValueError("no SFT checkpoint yet: run `instructflow stage sft` first")
    rows = queries.sft_examples(wh, checkpoint["dataset_hash"], None if source == "all" else "eval")
    unique = list({(r["instruction"], r["input"]): r for r in rows}.values())
    if not unique:
        raise ValueError(f"the SFT dataset {checkpoint['dataset_hash']} has no {source} prompts")
    texts = [r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "") for r in unique]
    order = hashed_order(texts, seed)
    picked = [order[(skip + i) % len(order)] for i in range(min(n, len(order)))]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint["path"])
    return [(texts[i], to_prompt_completion(InstructionExample(unique[i]["instruction"], unique[i]["input"], "",
                                                               "heldout"), cfg.sft.style, tokenizer)["prompt"])
            for i in picked]


def format_prompt(cfg: Config, tokenizer, instruction: str) -> str:
    """An imported or judged instruction in the policy's prompt format."""
    return to_prompt_completion(InstructionExample(instruction, "", "", "imported"), cfg.sft.style, tokenizer)["prompt"]
