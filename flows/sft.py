"""Stage 3, sft: kept instructions x instances (plus the seeds' own instances) -> TRL SFTTrainer
on the Llama actor. The checkpoint is registered with the dataset's content hash."""
from __future__ import annotations

from prefect import flow

from instructflow.flows.common import StageSpec, checkpoint_exists, publish_artifacts, recipe_task, stage_context
from instructflow.flows.teacher import local_model_dir
from instructflow.tasks.config import Config, stable_hash
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


train = recipe_task("train-sft", "sft")  # in this process, or under `accelerate launch` (sft.launcher)


@flow(name="sft", log_prints=True, validate_parameters=False)
def sft_flow(cfg: Config, home: str, run_id: str | None = None, force: bool = False) -> dict:
    from transformers import AutoTokenizer

    with stage_context(STAGE, cfg, home, run_id, force) as ctx:
        data_hash, train_examples, eval_examples = current_dataset(cfg, ctx.wh)
        if not train_examples:
            raise ValueError("sft: no kept instructions or seed tasks in the warehouse yet: run "
                             "`instructflow stage generate` (or `instructflow run`) first")
        queries.store_sft_examples(ctx.wh, data_hash, [("train", e) for e in train_examples] +
                                   [("eval", e) for e in eval_examples])
        base = ctx.base_model = local_model_dir(cfg.sft.base_model)
        tokenizer = AutoTokenizer.from_pretrained(base)
        train_rows = [to_prompt_completion(e, cfg.sft.style, tokenizer) for e in train_examples]
        eval_rows = [to_prompt_completion(e, cfg.sft.style, tokenizer) for e in eval_examples]
        # same data + same config -> same folder, so an interrupted run resumes from its checkpoint
        result = train(train_rows, eval_rows, cfg.sft, base, ctx.run_dir(data_hash, str(base)), on_step=ctx.step)
        metrics = {"train_examples": len(train_rows), "eval_examples": len(eval_rows),
                   "eval_loss_before": result["eval_loss_before"], "eval_loss_after": result["eval_loss_after"],
                   "train_loss_last": result["train_loss_last"], "checkpoint": str(result["checkpoint"]),
                   "dataset_hash": data_hash, "tokens_per_s": result["tokens_per_s"],
                   "tokens_seen": result.get("tokens_seen"), "wall_s": result.get("wall_s"),
                   "resumed_from": result.get("resumed_from"), "base_model": str(base),
                   "world_size": result.get("world_size")}
        ctx.wh.register_checkpoint(ctx.stage_run_id, "sft", str(result["checkpoint"]), str(base), data_hash,
                                   {"sft": vars(cfg.sft)}, metrics)
        ctx.finish(metrics, output_hash=stable_hash([str(result["checkpoint"]), data_hash, ctx.inputs["config"]]))
        samples = [{"split": "eval", "prompt": r["prompt"][-300:], "completion": r["completion"][:300]}
                   for r in eval_rows[:20]]
        publish_artifacts(ctx, "sft", metrics, samples=samples, plots={"loss": result.get("plot")})
    return metrics


def sft_data_inputs(cfg: Config, wh: Warehouse) -> dict:
    return {"dataset": current_dataset(cfg, wh)[0]}


STAGE = StageSpec(
    name="sft", flow=sft_flow, config_sections=("sft",), upstream=("filter",), data_inputs=sft_data_inputs,
    outputs_exist=checkpoint_exists("sft"), summary="supervised fine-tuning of the Llama actor (TRL SFTTrainer)",
    headline=("train_examples", "eval_loss_before", "eval_loss_after", "tokens_per_s", "wall_s"),
)
