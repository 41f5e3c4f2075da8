"""The prompts the stages after SFT share: which held-out prompts preferences, PPO and evaluate use,
and any instruction in the exact prompt format the policy was fine-tuned on."""
from __future__ import annotations

from instructflow.tasks.config import Config
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
