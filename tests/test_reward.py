"""The reward-model recipe on a tiny random Llama (real TRL RewardTrainer, CPU, seconds)."""
from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForSequenceClassification

from instructflow.models.bundled import ensure_bundled_hf_dir
from instructflow.models.recipe_io import pair_length_grouped
from instructflow.models.reward import RewardInputError, score, train_reward
from instructflow.models.tiny import build_tiny_llama
from instructflow.tasks.config import RewardConfig

pytestmark = pytest.mark.slow  # starts a server, Prefect, or trains

WORDS = "apple river stone cloud paper green quick table window music garden silver".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Stands in for an SFT checkpoint: a LlamaForCausalLM dir with the SmolLM2 tokenizer."""
    cache = Path(os.environ.get("INSTRUCTFLOW_CACHE") or Path.home() / ".cache" / "instructflow")
    return build_tiny_llama(tmp_path_factory.mktemp("reward") / "tiny", tokenizer_dir=ensure_bundled_hf_dir(cache))


GOOD = ["thanks", "please", "glad", "welcome", "great", "happy"]
BAD = ["sorry", "never", "cannot", "refuse", "wrong", "bad"]


def keyword_pairs(n: int, seed: int = 0) -> list[dict]:
    """Learnable, and not something a random model gets right by luck: both replies are the same random
    words with one keyword inserted at a random place, a "good" word in the chosen reply and a "bad" one
    in the rejected reply, each drawn from six (so length says nothing, and a random model's taste for
    one word over another averages out over 36 combinations)."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
        at = rng.randint(0, len(words))
        pairs.append({"prompt": f"### Instruction:\nWrite about topic {i}.\n\n### Response:\n",
                      "chosen": " ".join(words[:at] + [rng.choice(GOOD)] + words[at:]),
                      "rejected": " ".join(words[:at] + [rng.choice(BAD)] + words[at:])})
    return pairs


def settings(tiny: Path, out: Path, **overrides) -> dict:
    """train_reward's keyword arguments: the reward section, SFT model and output dir."""
    values = dict(max_length=64, max_steps=16, learning_rate=3e-3, batch_size=8, eval_steps=8, save_steps=8, seed=0)
    return {"cfg": RewardConfig(**{**values, **overrides}), "sft_model": tiny, "output_dir": out}


def test_reward_model_learns_a_keyword_preference(tiny, tmp_path):
    pairs = keyword_pairs(80)
    logged: list[tuple[int, dict]] = []
    metrics = train_reward(pairs[:64], pairs[64:], **settings(tiny, tmp_path / "rm"),
                           on_step=lambda s, v: logged.append((s, v)))
    assert metrics["train_pairs"] == 64 and metrics["eval_pairs"] == 16 and metrics["dropped_pairs"] == 0
    assert metrics["accuracy_before"] <= 0.75  # the random head cannot tell the keywords apart yet
    assert metrics["accuracy_after"] >= 0.8 and metrics["accuracy_after"] > metrics["accuracy_before"]
    assert metrics["margin_after"] > metrics["margin_before"] and metrics["margin_after"] > 0
    assert metrics["steps"] == 16 and metrics["resumed_from"] is None
    assert {"loss", "learning_rate", "accuracy", "margin"} <= set(next(v for s, v in logged if "loss" in v))
    assert any("eval_accuracy" in v for s, v in logged)
    assert logged[0] == (0, {"heldout_accuracy": metrics["accuracy_before"], "heldout_margin": metrics["margin_before"]})
    assert Path(metrics["plot"]).stat().st_size > 1000

    final = Path(metrics["checkpoint"])
    model = AutoModelForSequenceClassification.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert json.loads((final / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    assert isinstance(model, LlamaForSequenceClassification) and model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert json.loads((final / "metrics.json").read_text())["accuracy_after"] == metrics["accuracy_after"]

    # score(): one float per pair, the same numbers the held-out accuracy was computed from
    held_out = pairs[64:]
    chosen = score(final, [p["prompt"] for p in held_out], [p["chosen"] for p in held_out])
    rejected = score(final, [p["prompt"] for p in held_out], [p["rejected"] for p in held_out], batch_size=3)
    assert len(chosen) == 16 and all(isinstance(x, float) for x in chosen + rejected)
    assert sum(c > r for c, r in zip(chosen, rejected)) / 16 == metrics["accuracy_after"]
    assert sum(c - r for c, r in zip(chosen, rejected)) / 16 == pytest.approx(metrics["margin_after"], abs=1e-5)

    again = train_reward(pairs[:64], pairs[64:], **settings(tiny, tmp_path / "rm"))
    assert again["reused"] is True and again["accuracy_after"] == metrics["accuracy_after"]


def test_scores_do_not_depend_on_batch_padding_or_on_overlong_inputs(tiny, tmp_path):
    prompts = ["short", "a somewhat longer prompt with more words in it", "mid length prompt"]
    responses = ["a", "b c d e f g h", "x y"]
    batched = score(tiny_as_reward(tiny, tmp_path), prompts, responses, batch_size=3)
    single = [score(tiny_as_reward(tiny, tmp_path), [p], [r], batch_size=1)[0] for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(single, abs=1e-5)
    # batches are formed longest first; the scores still come back in the order of the inputs
    assert score(tiny_as_reward(tiny, tmp_path), prompts, responses, batch_size=2) == pytest.approx(single, abs=1e-5)
    # longer than max_length: the end (the reply and its eos) is kept, so the score is the last window's
    long = score(tiny_as_reward(tiny, tmp_path), [" word" * 300], [" fine"], max_length=32)
    window = score(tiny_as_reward(tiny, tmp_path), [" word" * 30], [" fine"], max_length=32)  # 30 + fine + eos
    assert long == pytest.approx(window, abs=1e-5)
    with pytest.raises(ValueError, match="3 prompts but 2 responses"):
        score(tiny_as_reward(tiny, tmp_path), prompts, responses[:2])


def tiny_as_reward(tiny: Path, tmp_path: Path) -> Path:
    out = tmp_path / "seqcls"
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1)
        model.score.weight.data.normal_(0, 1.0)  # a visible signal, so padding mistakes would show
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(tiny).save_pretrained(out)
    return out


def test_reward_resumes_and_lora_merges(tiny, tmp_path):
    pairs = keyword_pairs(24, seed=1)
    out = tmp_path / "resume"

    def stop_at_step_3(step: int, values: dict) -> None:
        if step == 3 and "loss" in values:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_reward(pairs[:16], pairs[16:], **settings(tiny, out, max_steps=4, save_steps=2, lora=True, lora_r=4),
                     on_step=stop_at_step_3)
    steps: list[int] = []
    metrics = train_reward(pairs[:16], pairs[16:],
                           **settings(tiny, out, max_steps=4, save_steps=2, lora=True, lora_r=4),
                           on_step=lambda s, v: steps.append(s))
    assert metrics["resumed_from"] == str(out / "checkpoints" / "checkpoint-2")
    assert steps[0] == 3 and metrics["steps"] == 4 and metrics["lora"] == "lora"
    final = Path(metrics["checkpoint"])
    assert not (final / "adapter_config.json").exists()
    assert isinstance(AutoModelForSequenceClassification.from_pretrained(final), LlamaForSequenceClassification)


@pytest.mark.parametrize("case, message", [
    ("empty train", "train set is empty"),
    ("missing sft model", "sft_model .*/nope does not exist"),
    ("missing field", r"train\[0\]: missing field 'rejected'"),
    ("too long", "every train pair is longer than max_length=8 tokens"),
])
def test_bad_input_is_one_clear_line(case, message, tiny, tmp_path):
    train, s = keyword_pairs(4), settings(tiny, tmp_path / "out")
    if case == "empty train":
        train = []
    elif case == "missing sft model":
        s["sft_model"] = tmp_path / "nope"
    elif case == "missing field":
        train = [{"prompt": "p", "chosen": "c"}]
    elif case == "too long":
        s["cfg"] = dataclasses.replace(s["cfg"], max_length=8)
    with pytest.raises(RewardInputError, match=message) as info:
        train_reward(train, [], **s)
    assert "\n" not in str(info.value)


def test_length_grouped_batches_pad_less_and_still_cover_every_pair_once(tiny, tmp_path):
    """reward.group_by_length: the pair-width sampler groups short pairs with short ones, so a batch (chosen and
    rejected padded together) holds fewer pad tokens, and an epoch still reads each pair exactly once."""
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig, RewardTrainer

    rng = random.Random(3)
    pairs = [{"prompt": f"Topic {i}: ", "chosen": " ".join(rng.choice(WORDS) for _ in range(n)),
              "rejected": " ".join(rng.choice(WORDS) for _ in range(n - 1))}
             for i, n in enumerate(rng.choice([3, 40]) for _ in range(64))]
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    padded, seen = {}, {}
    for strategy in ("group_by_length", "random"):
        args = TRLRewardConfig(output_dir=str(tmp_path / strategy), per_device_train_batch_size=4, use_cpu=True,
                               report_to="none", train_sampling_strategy=strategy, seed=0, max_length=128)
        model = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = pair_length_grouped(RewardTrainer)(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                                                     processing_class=tokenizer)
        batches = list(trainer.get_train_dataloader())
        padded[strategy] = sum(int((b["attention_mask"] == 0).sum()) for b in batches)
        seen[strategy] = sorted(tuple(row[mask.bool()].tolist()) for b in batches
                                for row, mask in zip(b["input_ids"], b["attention_mask"]))
    assert seen["group_by_length"] == seen["random"] and len(seen["random"]) == 2 * len(pairs)
    assert padded["group_by_length"] < padded["random"] / 2, padded
