"""PPO recipe: TRL 1.12's experimental PPOTrainer with four Llamas, saving the critic and resuming.

    actor      policy being trained            starts as the SFT model (or the last saved round's policy)
    reference  frozen copy of the SFT model    always the ORIGINAL SFT model, also after a resume (KL anchor)
    reward     frozen reward model             LlamaForSequenceClassification, num_labels=1
    critic     value model being trained       starts as the reward model (or `value_model`, or the last round's value)

All four share one tokenizer: TRL feeds the policy's token ids straight into the reward and value
models. All four are loaded by recipe_io.load_model, with the section's attention kernel and RoPE scaling
(so they read those ids at the same positions; the saved rounds' config.json carry the scaling). The
tokenizer must have a pad token distinct from eos (else padding masks the real end of a reply and the
score lands in the wrong place).

What we add on top of TRL, whose `train()` can neither resume nor save the value model:

* Chunks. Training runs as a sequence of fresh PPOTrainers, each doing `save_every_steps` PPO
  updates (one update = one rollout batch of batch_size * grad_accum prompts, then num_ppo_epochs
  passes over it). After each chunk the (policy, value) pair is written to
  `output_dir/rounds/round-{step:06d}/{policy,value}` plus `optimizer.pt` and `state.json`, in a
  temp dir renamed into place, so a round on disk is always complete.
* final/. The last round becomes `output_dir/final` (renamed, not copied; its optimizer.pt dropped,
  `metrics.json` written last, as every recipe's final/), then rounds/ is removed unless
  `keep_checkpoints` (recipe_io.drop_resume_state): a finished run keeps only its result, and a rerun
  of the same job (section, models, prompts: recipe_io.fingerprint) returns final/metrics.json. The
  trained critic (final/value) is resume state too: nothing after PPO reads it, so it goes with the
  rounds (`value_checkpoint` None) unless `keep_checkpoints` (a 135M critic is 0.5 GB of a 2 GB demo home).
* One optimizer and LR schedule for the whole run. TRL would build a fresh AdamW per trainer,
  and a fresh Adam's first step moves every weight by ~lr whatever its gradient: a jolt at every
  chunk. We pass the same AdamW (TRL's defaults: betas 0.9/0.999, eps 1e-8, no weight decay) to
  every chunk, with TRL's default schedule, linear decay from learning_rate to 0, computed from the
  GLOBAL update number over all updates of the run (the actor in its own parameter group: learning
  rate 0 for the first `value_warmup_updates`, then decaying over the rest). The optimizer state is saved with the newest
  round only (older rounds drop their optimizer.pt: it is 2x the trainable weights, 2.2 GB for
  SmolLM2-135M actor + critic; `save_optimizer=False` skips it, and a resume then restarts Adam).
* Resume. A rerun with the same output_dir loads the newest round's policy as actor, its value as
  critic and its optimizer state, and trains only the remaining updates; step numbers continue and
  the episode total stays `total_episodes`. Each chunk is seeded with `seed + its first global step`
  (prompt order, sampling, minibatch shuffles), so a resumed run replays what the uninterrupted run
  would have done (bit-identical on CPU). With LoRA a resume starts fresh adapters and a fresh Adam
  on the merged weights (no optimizer state is kept for LoRA runs).
* Per-update metrics to `on_step(global_step, metrics)` with friendly names (see METRIC_NAMES), and
  the summary (also `final/metrics.json`, written last into final/).

Several processes (`accelerate launch` with a data-parallel config, models/launch.py): every rank loads the
four models and runs the same chunks; each chunk's PPOTrainer wraps actor + critic in DDP (again per chunk,
around the one optimizer), gives each rank its own share of the prompts and its own sampling seed, so an
update is `batch_size * grad_accum` rollouts on EVERY rank and averages their gradients. The update count
stays `total_episodes / (batch_size * grad_accum)`; `episodes` counts the rollouts of all ranks. The frozen
reference and reward models are a whole copy on each rank. Rank 0 alone writes rounds, final/, the plot.
FSDP and DeepSpeed are refused at config load (tasks/config.py PPOConfig.LAUNCH_TYPES): per chunk they would
shard actor and critic anew (DeepSpeed: a new engine around an optimizer already wrapped by the last one), and
a round is saved from rank 0's whole models.

Memory options for models bigger than the CPU smoke tests:
* `gradient_checkpointing=True`: recompute activations of actor and critic in the backward pass
  (TRL's PPOTrainer never enables it itself; we do, and TRL switches it off around generation).
* `precision="bf16"` (or "auto" on a GPU with bf16): actor and critic keep float32 weights and
  optimizer state and run under bf16 autocast; the frozen reference and reward models are loaded
  in bf16 (half their memory). TRL's own `bf16` flag is not used: its Accelerator ignores it.
* `lora=True`: LoRA adapters (recipe_io.lora_config, the builder every recipe uses) on actor AND critic; only the
  adapters (and the critic's score head) are trained, so optimizer state shrinks to a few MB.
  Saved rounds hold the merged weights (plain from_pretrained dirs). The reference is still a
  separate full copy of the SFT model.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from instructflow.models.files import replace_dir, write_dir_atomically, write_json
from instructflow.models.launch import job_main
from instructflow.models.recipe_io import (METRICS_FILE, ReportSteps, check_machine, drop_resume_state,
                                           finished_metrics, fingerprint, is_main_rank, load_model, lora_config,
                                           model_kwargs, read_json, resolve_precision, world_size)
from instructflow.tasks.config import PPOConfig
from instructflow.tasks.plots import plot_lines

# our name -> the key in the dict PPOTrainer logs once per update
METRIC_NAMES = {
    "reward": "objective/scores",  # mean reward-model score of the rollouts, missing-eos penalty included
    "rlhf_reward": "objective/rlhf_reward",  # score - kl_coef * KL: what PPO maximizes
    "kl": "objective/kl",  # sum over response tokens of log pi - log ref (k1), mean over rollouts
    "entropy": "objective/entropy",
    "non_score_reward": "objective/non_score_reward",
    "policy_loss": "loss/policy_avg",
    "value_loss": "loss/value_avg",
    "clipfrac": "policy/clipfrac_avg",
    "value_clipfrac": "val/clipfrac_avg",
    "ratio": "val/ratio",  # new/old policy probability ratio; should stay near 1.0
    "approxkl": "policy/approxkl_avg",
    "num_eos_tokens": "val/num_eos_tokens",
    "lr": "lr",
    "episode": "episode",  # rollouts done in this chunk (TRL's own count)
}


class PPOInputError(ValueError):
    pass


@dataclass
class Round:
    path: Path
    step: int  # PPO updates done
    episodes: int
    state: dict[str, Any]


def train_ppo(prompts: Sequence[str], cfg: PPOConfig, policy_model: Path, reward_model: Path, output_dir: Path,
              value_model: Path | None = None, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train the policy with PPO on `prompts` (already in the policy's prompt format) with the `ppo` section
    `cfg`; resume if possible. `policy_model` is the SFT checkpoint (actor, and the frozen reference), the
    critic starts from `value_model` or else `reward_model`.

    Returns steps, episodes, reward_first, reward_last, kl_last, policy_checkpoint, value_checkpoint,
    episodes_per_s (this call), wall_s, resumed_from (round dir or None), plot, skipped_prompts,
    (paths as str), plus updates_this_run, prompts_used and world_size; the same dict is final/metrics.json.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed

    started = time.time()
    models = {"policy_model": Path(policy_model), "reward_model": Path(reward_model),
              "value_model": Path(value_model) if value_model is not None else None}
    _check_inputs(cfg, models)
    precision = resolve_precision(cfg.precision, PPOInputError, fp16_ok=False)  # the PPO loop has no loss scaling
    check_machine(cfg, precision, PPOInputError)
    policy_model, reward_model, value_model = models["policy_model"], models["reward_model"], models["value_model"]
    output_dir = Path(output_dir)
    job = fingerprint(cfg, {name: path.resolve() if path else None for name, path in models.items()},
                      [{"prompt": prompt} for prompt in prompts])
    done = finished_metrics(output_dir, job, PPOInputError)
    if done is not None:  # this job finished here before: its result, without loading a model
        if not cfg.keep_checkpoints:
            if is_main_rank():  # left by a run killed after publishing final/, or kept by an earlier setting
                drop_resume_state(output_dir)
                shutil.rmtree(output_dir / "final" / "value", ignore_errors=True)
            done["value_checkpoint"] = None
        return done
    rollout_batch = cfg.batch_size * cfg.grad_accum   # per rank: under a launch every rank samples its own
    total_updates = cfg.total_episodes // rollout_batch
    world = world_size()

    # ---- tokenizer and prompts ----------------------------------------------------------------
    tokenizer = _checked_tokenizer(models)
    queries, skipped = tokenize_prompts(tokenizer, prompts, cfg.max_prompt_length)
    if not queries:
        raise PPOInputError(f"train_ppo: none of the {len(prompts)} prompts is usable "
                            f"({skipped} empty or longer than max_prompt_length={cfg.max_prompt_length} tokens)")
    prompts_used = len(queries)
    # TRL's dataloader drops incomplete batches and loops forever: fewer prompts than a batch would hang it
    while len(queries) < rollout_batch:
        queries = queries + queries
    dataset = Dataset.from_dict({"input_ids": queries})

    # ---- where to start: fresh or the newest complete round ------------------------------------
    rounds_dir = output_dir / "rounds"
    resume = last_complete_round(rounds_dir)
    step, episodes, history = 0, 0, []
    if resume is not None:
        _check_resumable(resume, cfg, policy_model, rollout_batch, total_updates)
        step, episodes, history = resume.step, resume.episodes, list(resume.state.get("history", []))
    if is_main_rank():
        print(f"ppo: {'resuming from ' + str(resume.path) if resume else 'fresh start'}; "
              f"{step}/{total_updates} updates done, {prompts_used} prompts ({skipped} skipped)")

    # ---- the four models ------------------------------------------------------------------------
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    frozen_dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    actor_dir = resume.path / "policy" if resume else policy_model
    critic_dir = resume.path / "value" if resume else (value_model or reward_model)
    # every one with the section's attention kernel and RoPE scaling: they read the same token sequences
    actor = load_model(AutoModelForCausalLM, actor_dir, cfg, dtype=torch.float32)
    reference = load_model(AutoModelForCausalLM, policy_model, cfg, dtype=frozen_dtype)
    reward = load_model(AutoModelForSequenceClassification, reward_model, cfg, num_labels=1, dtype=frozen_dtype)
    critic = load_model(AutoModelForSequenceClassification, critic_dir, cfg, num_labels=1, dtype=torch.float32)
    for model in (reference, reward, critic):
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classifiers find the last token by it
    reference.eval().requires_grad_(False)
    reward.eval().requires_grad_(False)
    if cfg.lora:
        from peft import get_peft_model

        actor = get_peft_model(actor, lora_config(cfg, "CAUSAL_LM"))
        critic = get_peft_model(critic, lora_config(cfg, "SEQ_CLS"))  # its score head trains in full
    if cfg.gradient_checkpointing:
        for model in (actor, critic):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    save_tokenizer = AutoTokenizer.from_pretrained(policy_model)  # as loaded: without our left padding

    # ---- one optimizer and LR schedule across all chunks (see the module docstring) -------------
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]} for model in (actor, critic)]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                  fused=True)  # as TRL's default "adamw_torch_fused"; several times faster on CPU
    if resume is not None and (resume.path / "optimizer.pt").is_file() and not cfg.lora:
        optimizer.load_state_dict(torch.load(resume.path / "optimizer.pt", map_location="cpu", weights_only=True))
    first_step, warmup = step, cfg.value_warmup_updates
    # TRL steps the scheduler once per update; u counts the updates of this call. The critic decays linearly
    # over all updates; the actor stands still for the warm-up updates, then decays over the rest.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [
        lambda u: 0.0 if first_step + u < warmup else 1.0 - (first_step + u - warmup) / (total_updates - warmup),
        lambda u: 1.0 - (first_step + u) / total_updates])

    chunk = {"episodes": 0, "started": time.time()}  # the chunk being trained: episodes before it, its start

    def report(global_step: int, metrics: dict[str, float]) -> None:
        done_in_chunk = metrics.pop("episode", 0.0)
        metrics["episodes"] = float(chunk["episodes"] + done_in_chunk)
        # TRL's own "eps" is rounded down to an int: useless below 1 episode/s on a CPU
        metrics["episodes_per_s"] = done_in_chunk / max(time.time() - chunk["started"], 1e-9)
        history.append({"step": global_step, **metrics})
        if on_step is not None:
            on_step(global_step, dict(metrics))

    # ---- PPO in chunks of save_every_steps updates, a round saved after each ----------------------
    train_started = time.time()
    output_dir.mkdir(parents=True, exist_ok=True)
    last_round = resume
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    # TRL calls gc.collect() twice per update; with transformers' import-time objects moved out of the
    # collector's reach (unfrozen again below) each call takes milliseconds instead of ~0.2 s
    gc.freeze()
    try:
        while step < total_updates:
            updates = min(cfg.save_every_steps, total_updates - step)
            set_seed(cfg.seed + step)  # python, numpy (minibatch shuffles), torch (prompt order, sampling)
            trainer = _ppo_trainer(cfg, output_dir, updates * rollout_batch * world, cfg.seed + step, tokenizer, actor,
                                   reference, reward, critic, dataset, optimizer, scheduler)
            trainer.add_callback(ReportSteps(report, names=METRIC_NAMES, first_step=step))
            chunk.update(episodes=episodes, started=time.time())
            with autocast:
                trainer.train()
            step, episodes = step + updates, episodes + updates * rollout_batch * world
            del trainer
            gc.collect()
            state = {"global_step": step, "episodes": episodes, "seed": cfg.seed, "next_chunk_seed": cfg.seed + step,
                     "rollout_batch": rollout_batch, "total_episodes": cfg.total_episodes, "world_size": world,
                     "policy_model": str(policy_model.resolve()), "reward_model": str(reward_model.resolve()),
                     "settings": {**asdict(cfg), **{k: str(v) if v is not None else None for k, v in models.items()}},
                     "history": history}
            saved = rounds_dir / f"round-{step:06d}"
            if is_main_rank():  # every rank holds the same actor and critic (DDP); one writes them
                save_round(rounds_dir, step, actor, critic, save_tokenizer, state,
                           optimizer=optimizer if cfg.save_optimizer and not cfg.lora else None)
                _prune_rounds(rounds_dir, keep=cfg.keep_rounds or None, newest=saved)
            last_round = Round(saved, step, episodes, state)
    finally:
        gc.unfreeze()
    train_wall = time.time() - train_started

    # ---- plot, summary, and the last round as final/ (rank 0 writes; metrics.json goes in last) -------
    final_dir = output_dir / "final"
    if last_round is None:  # total_updates == 0 cannot happen (checked), but keep the invariant explicit
        raise PPOInputError("train_ppo: nothing trained and no saved round")
    if not is_main_rank():
        _wait_for_every_rank(torch)  # for rank 0's final/
        return read_json(final_dir / METRICS_FILE) or {}
    from instructflow.tasks.trend import least_squares_slope

    steps_seen = [h["step"] for h in history]
    plot = plot_lines(output_dir / "ppo.png", "PPO: reward-model score and KL to the SFT model",
                      {"reward": (steps_seen, [h["reward"] for h in history]),
                       "rlhf_reward": (steps_seen, [h["rlhf_reward"] for h in history]),
                       "kl": (steps_seen, [h["kl"] for h in history])}, xlabel="PPO update")
    updates_this_run = step - first_step
    metrics = {
        "steps": step,
        "episodes": episodes,  # rollouts of every rank
        "reward_first": history[0]["reward"] if history else None,
        "reward_last": history[-1]["reward"] if history else None,
        "reward_slope": least_squares_slope(steps_seen, [h["reward"] for h in history]),  # per update
        "kl_last": history[-1]["kl"] if history else None,
        "policy_checkpoint": str(final_dir / "policy"),
        "value_checkpoint": str(final_dir / "value") if cfg.keep_checkpoints else None,
        "episodes_per_s": updates_this_run * rollout_batch * world / train_wall if updates_this_run else None,
        "wall_s": time.time() - started,
        "resumed_from": str(resume.path) if resume else None,
        "plot": str(plot),
        "skipped_prompts": skipped,
        "prompts_used": prompts_used,
        "updates_this_run": updates_this_run,
        "world_size": world,
        "fingerprint": job,
    }
    publish_last_round(last_round.path, final_dir, metrics)
    if not cfg.keep_checkpoints:
        drop_resume_state(output_dir)
        shutil.rmtree(final_dir / "value", ignore_errors=True)  # after metrics.json: a kill leaves it, not a hole
    _wait_for_every_rank(torch)
    return metrics


def _wait_for_every_rank(torch) -> None:
    """A barrier when this process is one rank of a launch (the trainers' process group outlives them)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ------------------------------------------------------------------------------------------------
# Input checks

def _check_inputs(cfg: PPOConfig, models: dict[str, Path | None]) -> None:
    """The model dirs, and whether the section's RoPE scaling applies to them (the section checked itself when
    it was built)."""
    for name, path in models.items():
        if path is not None and not (path / "config.json").is_file():
            raise PPOInputError(f"train_ppo: {name} {path} is not a model dir (no config.json)")
        if path is not None:
            model_kwargs(path, cfg, PPOInputError)


def _checked_tokenizer(models: dict[str, Path | None]):
    """The policy's tokenizer (left padding), after checking reward/value models speak the same one."""
    from transformers import AutoConfig, AutoTokenizer

    policy_model = models["policy_model"]
    tokenizer = AutoTokenizer.from_pretrained(policy_model)
    if tokenizer.pad_token_id is None:
        raise PPOInputError(f"train_ppo: policy_model {policy_model} tokenizer has no pad token")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise PPOInputError(f"train_ppo: policy_model {policy_model} tokenizer pads with eos "
                            f"({tokenizer.eos_token!r}); PPO needs a distinct pad token (see ensure_distinct_pad)")
    vocab = tokenizer.get_vocab()
    for name, path in models.items():
        if path is None:
            continue
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "vocab_size", len(tokenizer)) < len(tokenizer):
            raise PPOInputError(f"train_ppo: {name} {path} has vocab_size {config.vocab_size} but the policy "
                                f"tokenizer has {len(tokenizer)} tokens")
        if name == "policy_model" or not (path / "tokenizer_config.json").is_file():
            continue
        other = AutoTokenizer.from_pretrained(path)
        if len(other) != len(tokenizer) or other.get_vocab() != vocab:
            raise PPOInputError(f"train_ppo: {name} {path} tokenizer differs from the policy's "
                                f"({len(other)} vs {len(tokenizer)} tokens); all PPO models must share one")
        if other.pad_token_id != tokenizer.pad_token_id:
            raise PPOInputError(f"train_ppo: {name} {path} pad token id {other.pad_token_id} differs from the "
                                f"policy's {tokenizer.pad_token_id}")
    tokenizer.padding_side = "left"  # prompts are left-padded so every response starts at the same column
    return tokenizer


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_prompt_length: int) -> tuple[list[list[int]], int]:
    """Token ids per usable prompt, and how many were dropped (empty, too long, or containing the pad token)."""
    queries, skipped = [], 0
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]  # prompts arrive fully formatted
        # TRL finds padding by token id: a literal pad token inside a prompt would be masked out
        if not ids or len(ids) > max_prompt_length or tokenizer.pad_token_id in ids:
            skipped += 1
            continue
        queries.append(ids)
    return queries, skipped


def _check_resumable(found: Round, cfg: PPOConfig, policy_model: Path, rollout_batch: int, total_updates: int) -> None:
    state = found.state
    if state.get("rollout_batch") != rollout_batch:
        raise PPOInputError(f"{found.path}/state.json: saved with rollout batch {state.get('rollout_batch')}, "
                            f"settings give {rollout_batch}; use a fresh output_dir")
    if state.get("policy_model") != str(policy_model.resolve()):
        raise PPOInputError(f"{found.path}/state.json: started from policy {state.get('policy_model')}, "
                            f"this run gives {policy_model}; use a fresh output_dir")
    if found.step > total_updates:
        raise PPOInputError(f"{found.path}/state.json: {found.step} updates already done, more than the "
                            f"{total_updates} of ppo.total_episodes={cfg.total_episodes}")


# ------------------------------------------------------------------------------------------------
# One chunk: a PPOTrainer for `episodes` rollouts

def _ppo_trainer(cfg: PPOConfig, output_dir: Path, episodes: int, seed: int, tokenizer, actor, reference, reward,
                 critic, dataset, optimizer, scheduler):
    import warnings

    import torch

    from transformers import PrinterCallback, ProgressCallback

    with warnings.catch_warnings():  # "APIs here are unstable": known, TRL 1.12 is pinned for this module
        warnings.filterwarnings("ignore", message=".*trl.experimental")
        from trl.experimental.ppo import PPOConfig, PPOTrainer

    config = PPOConfig(
        output_dir=str(output_dir), report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        total_episodes=episodes, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        local_rollout_forward_batch_size=cfg.batch_size, num_mini_batches=cfg.num_mini_batches,
        num_ppo_epochs=cfg.num_ppo_epochs, learning_rate=cfg.learning_rate,
        response_length=cfg.response_length, temperature=cfg.temperature, kl_coef=cfg.kl_coef, cliprange=cfg.cliprange,
        vf_coef=cfg.vf_coef, lam=cfg.lam, stop_token="eos", missing_eos_penalty=cfg.missing_eos_penalty or None,
        num_sample_generations=0, seed=seed,
        bf16=False, fp16=False, gradient_checkpointing=False,  # handled by us, see the module docstring
        use_cpu=not torch.cuda.is_available(),  # else a launch on CPU ranks trains each rank alone (no gloo DDP)
    )
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=actor, ref_model=reference,
                         reward_model=reward, train_dataset=dataset, value_model=critic,
                         optimizers=(optimizer, scheduler))
    for noisy in (PrinterCallback, ProgressCallback):  # they print every log dict; on_step gets them instead
        trainer.remove_callback(noisy)
    return trainer


# ------------------------------------------------------------------------------------------------
# Rounds on disk

def last_complete_round(rounds_dir: Path) -> Round | None:
    """The round with the most updates whose dir is complete (state.json, policy and value configs)."""
    found: list[Round] = []
    for path in Path(rounds_dir).glob("round-*"):
        try:
            step = int(path.name.removeprefix("round-"))
            state = json.loads((path / "state.json").read_text())
        except (ValueError, OSError):
            continue
        if (state.get("global_step") == step and (path / "policy" / "config.json").is_file()
                and (path / "value" / "config.json").is_file()):
            found.append(Round(path, step, int(state["episodes"]), state))
    return max(found, key=lambda r: r.step, default=None)


def save_round(rounds_dir: Path, step: int, actor, critic, tokenizer, state: dict, optimizer=None) -> Path:
    """Write policy/, value/ (each with the tokenizer), optimizer.pt and state.json (last), then rename into place."""
    import torch

    def write(tmp: Path) -> None:
        for name, model in (("policy", actor), ("value", critic)):
            _plain_model(model).save_pretrained(tmp / name)
            tokenizer.save_pretrained(tmp / name)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")

    return write_dir_atomically(Path(rounds_dir) / f"round-{step:06d}", write)


def publish_last_round(round_dir: Path, final_dir: Path, metrics: dict) -> Path:
    """The finished run's last round becomes `final_dir` by a rename (no second copy of policy and value):
    its optimizer state goes (nothing trains from it any more), metrics.json is written last. A kill
    before the rename leaves a complete round, which the rerun resumes at its end and publishes."""
    (round_dir / "optimizer.pt").unlink(missing_ok=True)
    write_json(round_dir / METRICS_FILE, metrics)
    return replace_dir(round_dir, final_dir)


def _plain_model(model):
    """A from_pretrained-loadable model: LoRA adapters merged into a copy (the live model keeps training)."""
    from peft import PeftModel

    return copy.deepcopy(model).merge_and_unload() if isinstance(model, PeftModel) else model


def _prune_rounds(rounds_dir: Path, keep: int | None, newest: Path) -> None:
    """Optimizer state only in the newest round; only the newest `keep` rounds (None: all)."""
    rounds = sorted(Path(rounds_dir).glob("round-*"), key=lambda p: p.name)
    for old in rounds:
        if old != newest:
            (old / "optimizer.pt").unlink(missing_ok=True)
    if keep is not None:
        for old in rounds[:-keep]:
            if old != newest:
                shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# `accelerate launch ... -m instructflow.models.ppo --job job.json` (models/launch.py)

def main(argv: Sequence[str] | None = None) -> int:
    """`python -m instructflow.models.ppo --job FILE`: what every rank of a launch runs."""
    return job_main("ppo", argv, PPOInputError)


if __name__ == "__main__":
    sys.exit(main())
