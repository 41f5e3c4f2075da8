"""The GRPO recipe with real TRL GRPOTrainer on tiny Llamas: the policy learns what the rewards ask, a
SIGKILLed run resumes from its last checkpoint, the reward terms are the reward model's score (the one
scoring rule) and the missing-eos rule, bad input is one line.

The models are built by hand so that a few CPU steps show learning (as in tests/test_ppo.py):
* policy: the tiny Llama whose output head puts nearly all probability on eight tokens, one of them eos,
  so a two-token completion ends with eos about one time in four;
* reward model: a LlamaForSequenceClassification whose attention and MLP outputs are zeroed, so it scores
  only the last token, which `score_with` always makes eos: a constant. The learning signal is the
  missing-eos rule (-1 for a completion cut by max_completion_length), so GRPO must raise the eos rate.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification

from instructflow.models.grpo import GRPOInputError, rule_and_model_rewards, train_grpo
from instructflow.models.reward import score_with
from instructflow.models.sampling import generate_responses
from instructflow.tasks.config import GRPOConfig
from recipe_helpers import KILLED_RECIPE, favouring_policy, kill_mid_training, last_token_reward, tiny_llama

pytestmark = pytest.mark.slow  # trains

WORDS = [" yes", " no", " red", " blue", " cat", " dog", " one"]
PROMPTS = [f"<|im_start|>user\nQuestion {i}: pick a word.<|im_end|>\n<|im_start|>assistant\n" for i in range(16)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("grpo-models")
    tiny = tiny_llama(root)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    favoured = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in WORDS] + [tokenizer.eos_token_id]
    return favouring_policy(tiny, favoured, root / "policy"), last_token_reward(tiny, root / "reward")


def settings(models: tuple[Path, Path], out: Path, **overrides) -> dict:
    values = dict(max_steps=8, batch_size=8, num_generations=4, max_completion_length=2, max_length=64,
                  learning_rate=5e-3, warmup_ratio=0.0, lr_scheduler="constant", save_steps=2, eval_steps=2,
                  beta=0.0, temperature=1.0, seed=3)
    return {"cfg": GRPOConfig(**{**values, **overrides}), "policy_model": models[0], "reward_model": models[1],
            "output_dir": out}


def eos_rate(model_dir: Path) -> float:
    """Share of sampled two-token replies that end with eos (the sampler strips it: a reply of one word)."""
    replies = [r for rs in generate_responses(model_dir, PROMPTS[:4], k=16, max_new_tokens=2, temperature=1.0, seed=0)
               for r in rs]
    return sum(len(r.split()) <= 1 for r in replies) / len(replies)


def test_grpo_raises_the_reward_and_the_eos_rate(models, tmp_path):
    steps: list[tuple[int, dict]] = []
    metrics = train_grpo(PROMPTS, **settings(models, tmp_path / "run", beta=0.04),
                         on_step=lambda s, v: steps.append((s, v)))
    rewards = [v["reward"] for s, v in steps if "reward" in v]
    assert len(rewards) == 8 and {"kl", "entropy", "missing_eos", "reward_model"} <= set(steps[0][1])
    assert statistics.fmean(rewards[-3:]) > statistics.fmean(rewards[:3]) + 0.15, rewards
    assert metrics["reward_slope"] > 0 and metrics["reward_first"] == rewards[0] and metrics["reward_last"] == rewards[-1]
    assert metrics["steps"] == 8 and metrics["prompts_used"] == 16 and metrics["skipped_prompts"] == 0
    assert metrics["kl_last"] is not None and metrics["episodes_per_s"] > 0
    assert eos_rate(Path(metrics["checkpoint"])) > eos_rate(models[0]) + 0.15
    assert isinstance(LlamaForCausalLM.from_pretrained(metrics["checkpoint"]), LlamaForCausalLM)


def test_the_reward_terms_are_the_reward_models_score_and_the_eos_rule(models):
    tokenizer = AutoTokenizer.from_pretrained(models[1])
    reward = LlamaForSequenceClassification.from_pretrained(models[1]).eval()
    model_term, eos_term = rule_and_model_rewards(reward, tokenizer, tokenizer.eos_token_id, 1.0, 64)
    prompts, completions = PROMPTS[:2], [" yes", " no"]
    assert model_term(prompts=prompts, completions=completions) == score_with(reward, tokenizer, prompts, completions)
    ended = [tokenizer(" yes", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
             tokenizer(" no no", add_special_tokens=False)["input_ids"]]
    assert eos_term(prompts=prompts, completions=completions, completion_ids=ended) == [0.0, -1.0]


RUN_UNTIL_KILLED = KILLED_RECIPE + """
from instructflow.models.grpo import train_grpo
from instructflow.tasks.config import GRPOConfig
train_grpo(job["prompts"], GRPOConfig(**job["cfg"]), Path(job["policy"]), Path(job["reward"]), Path(job["out"]),
           on_step=record)
"""


def test_a_sigkilled_run_resumes_from_its_last_checkpoint(models, tmp_path):
    out, log, job = tmp_path / "run", tmp_path / "steps.log", tmp_path / "job.json"
    cfg = dict(max_steps=10, batch_size=8, num_generations=4, max_completion_length=2, max_length=64,
               learning_rate=5e-3, warmup_ratio=0.0, lr_scheduler="constant", save_steps=2, eval_steps=2, beta=0.0,
               temperature=1.0, seed=3)
    job.write_text(json.dumps({"prompts": PROMPTS, "cfg": cfg, "policy": str(models[0]), "reward": str(models[1]),
                               "out": str(out)}))
    newest = kill_mid_training(RUN_UNTIL_KILLED, [str(job), str(log)], out / "checkpoints", log)
    assert not (out / "final").exists() and newest >= 4
    resumed: list[int] = []
    metrics = train_grpo(PROMPTS, GRPOConfig(**cfg), *models, out, on_step=lambda s, v: resumed.append(s))
    assert metrics["resumed_from"] == str(out / "checkpoints" / f"checkpoint-{newest}")
    assert min(resumed) == newest + 1 and metrics["steps"] == 10 and (out / "final" / "config.json").is_file()


def test_bad_input_is_one_clear_line(models, tmp_path):
    with pytest.raises(GRPOInputError, match=r"^none of the 1 prompts fits in max_length - max_completion_length"):
        train_grpo(["word " * 200], **settings(models, tmp_path / "a", max_length=16, max_completion_length=2))
    with pytest.raises(GRPOInputError, match="reward_model .* does not exist"):
        train_grpo(PROMPTS, **{**settings(models, tmp_path / "b"), "reward_model": tmp_path / "nowhere"})
    with pytest.raises(GRPOInputError, match="train set is empty"):
        train_grpo([], **settings(models, tmp_path / "c"))
