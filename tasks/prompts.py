"""The prompts the stages after SFT share: which held-out prompts preferences, PPO, GRPO and evaluate
use, the one train/eval split of the preference pairs (reward, DPO, evaluate's held-out reward model),
and any instruction in the exact prompt format the policy was fine-tuned on."""
from __future__ import annotations

from dataclasses import dataclass

from instructflow.tasks.config import Config, stable_hash
from instructflow.tasks.preferences import hashed_order, split_pairs
from instructflow.tasks.sft_data import InstructionExample, to_prompt_completion
from instructflow.warehouse import queries
from instructflow.warehouse.store import Warehouse


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


def format_prompt(cfg: Config, tokenizer, instruction: str, input: str = "") -> str:
    """An imported, judged or evaluated task in the policy's prompt format."""
    return to_prompt_completion(InstructionExample(instruction, input, "", "imported"), cfg.sft.style, tokenizer)["prompt"]


def reward_split(cfg: Config, tokenizer, pairs: list[dict]) -> tuple[list[dict], list[dict]]:
    """The reward stage's (train, eval) split of `pairs` (queries.training_pairs), prompts in the policy's
    format, each row keeping its pair_key: PPO's reward model trains on the first part, evaluate's
    held-out reward model (evaluate.holdout_reward) on the second, so the two never share a pair."""
    rows = [{"pair_key": p["pair_key"], "prompt": format_prompt(cfg, tokenizer, p["prompt"]),
             "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    return split_pairs(rows, cfg.reward.eval_fraction, cfg.reward.seed)


@dataclass(frozen=True)
class PreferenceSplit:
    sft_path: str
    train: list[dict]   # {pair_key, prompt (policy format), chosen, rejected}
    eval: list[dict]
    set_hash: str       # of every pair's key: names the data a run trained on


def preference_split(cfg: Config, wh: Warehouse) -> PreferenceSplit:
    """What reward and DPO train on: the stored pairs split as `reward_split` does (so the evaluation pairs
    stay unseen by every method), the SFT checkpoint they start from; a one-line error when either is missing."""
    from transformers import AutoTokenizer

    sft = wh.latest_checkpoint("sft")
    if sft is None:
        raise ValueError("no SFT checkpoint yet: run `instructflow stage sft` first")
    pairs = queries.training_pairs(wh)
    if len(pairs) < 4:
        raise ValueError(f"only {len(pairs)} usable preference pairs (need >= 4): judge more prompts "
                         "(preferences.prompts) or import a file (preferences.import_files)")
    train, held_out = reward_split(cfg, AutoTokenizer.from_pretrained(sft["path"]), pairs)
    return PreferenceSplit(sft["path"], train, held_out, stable_hash(sorted(p["pair_key"] for p in pairs)))


def rl_inputs(cfg: Config, wh: Warehouse, method: str) -> tuple[str, str, list[str]]:
    """(SFT checkpoint, reward checkpoint, prompts in the policy's format) of an RL stage (ppo, grpo): its
    section's `prompts` from `prompt_source`, in the order its `seed` gives, so the same settings pick the same prompts."""
    sft, reward = wh.latest_checkpoint("sft"), wh.latest_checkpoint("reward")
    if sft is None or reward is None:
        raise ValueError(f"{method} needs an SFT and a reward checkpoint: run the sft and reward stages first")
    section = getattr(cfg, method)
    prompts = [prompt for _, prompt in heldout_prompts(cfg, wh, section.prompt_source, section.prompts, section.seed)]
    return sft["path"], reward["path"], prompts


def pairs_input(cfg: Config, wh: Warehouse) -> dict:
    """The `data_inputs` of a stage that trains on the stored pairs (reward, dpo): their fingerprint."""
    return {"pairs": queries.pairs_fingerprint(wh)}
