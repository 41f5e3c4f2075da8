"""The DPO recipe on a tiny random Llama (real TRL DPOTrainer, real checkpoints, CPU): it learns a
preference, a SIGKILLed run resumes from its last checkpoint instead of starting over, bad input is one line."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from instructflow.models.bundled import ensure_bundled_hf_dir
from instructflow.models.dpo import DPOInputError, train_dpo
from instructflow.models.tiny import build_tiny_llama
from instructflow.tasks.config import DPOConfig
from instructflow.tasks.sft_data import alpaca_prompt
from recipe_helpers import KILLED_RECIPE, kill_mid_training

pytestmark = pytest.mark.slow  # trains

COLORS = ["red", "green", "blue", "yellow", "black", "white", "pink", "gray"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    cache = Path(os.environ.get("INSTRUCTFLOW_CACHE") or Path.home() / ".cache" / "instructflow")
    return build_tiny_llama(tmp_path_factory.mktemp("dpo") / "tiny", tokenizer_dir=ensure_bundled_hf_dir(cache))


def pairs(n: int) -> list[dict]:
    """Learnable: the chosen reply always ends with a full stop and names a color, the rejected one never does."""
    return [{"prompt": alpaca_prompt(f"Name color number {i}."), "chosen": f"The color is {COLORS[i % 8]}.",
             "rejected": f"I like number {i} a lot a lot"} for i in range(n)]


def settings(tiny: Path, out: Path, **overrides) -> dict:
    values = dict(max_length=64, max_steps=8, learning_rate=5e-3, batch_size=4, warmup_ratio=0.0,
                  lr_scheduler="constant", eval_steps=8, save_steps=2, seed=0, beta=0.1)
    return {"cfg": DPOConfig(**{**values, **overrides}), "sft_model": tiny, "output_dir": out}


def test_dpo_learns_the_preference_and_saves_a_plain_llama(tiny, tmp_path):
    steps: list[tuple[int, dict]] = []
    metrics = train_dpo(pairs(32), pairs(40)[32:], **settings(tiny, tmp_path / "run"),
                        on_step=lambda s, v: steps.append((s, v)))
    # the implicit reward separates held-out pairs it never trained on
    assert metrics["eval_accuracy"] >= 0.75 and metrics["eval_margin"] > 0, metrics
    assert metrics["eval_reward_chosen"] > metrics["eval_reward_rejected"]
    assert metrics["train_pairs"] == 32 and metrics["eval_pairs"] == 8 and metrics["steps"] == 8
    assert metrics["beta"] == 0.1 and metrics["tokens_per_s"] > 0 and metrics["wall_s"] > 0
    assert [s for s, v in steps if "loss" in v] == list(range(1, 9))
    assert all({"rewards/margins", "rewards/accuracies"} <= set(v) for s, v in steps if "loss" in v)
    assert Path(metrics["plot"]).stat().st_size > 1000
    final = Path(metrics["checkpoint"])
    model = AutoModelForCausalLM.from_pretrained(final)
    assert isinstance(model, LlamaForCausalLM)
    assert AutoTokenizer.from_pretrained(final).pad_token_id != AutoTokenizer.from_pretrained(final).eos_token_id
    assert json.loads((final / "metrics.json").read_text())["eval_accuracy"] == metrics["eval_accuracy"]
    again = train_dpo(pairs(32), pairs(40)[32:], **settings(tiny, tmp_path / "run"),
                      on_step=lambda s, v: pytest.fail("trained again"))
    assert again["reused"] is True


RUN_UNTIL_KILLED = KILLED_RECIPE + """
from instructflow.models.dpo import train_dpo
from instructflow.tasks.config import DPOConfig
train_dpo(job["train"], job["eval"], DPOConfig(**job["cfg"]), Path(job["sft_model"]), Path(job["out"]), on_step=record)
"""


def test_a_sigkilled_run_resumes_from_its_last_checkpoint(tiny, tmp_path):
    out, log, job = tmp_path / "run", tmp_path / "steps.log", tmp_path / "job.json"
    cfg = dict(max_length=64, max_steps=10, learning_rate=5e-3, batch_size=4, warmup_ratio=0.0, lr_scheduler="constant",
               eval_steps=10, save_steps=2, seed=0)
    job.write_text(json.dumps({"train": pairs(40), "eval": pairs(44)[40:], "sft_model": str(tiny), "out": str(out),
                               "cfg": cfg}))
    newest = kill_mid_training(RUN_UNTIL_KILLED, [str(job), str(log)], out / "checkpoints", log)
    assert not (out / "final").exists() and newest >= 4
    resumed: list[int] = []
    metrics = train_dpo(pairs(40), pairs(44)[40:], DPOConfig(**cfg), tiny, out, on_step=lambda s, v: resumed.append(s))
    assert metrics["resumed_from"] == str(out / "checkpoints" / f"checkpoint-{newest}")
    assert min(resumed) == newest + 1   # it went on, it did not start over
    assert metrics["steps"] == 10 and (out / "final" / "config.json").is_file()


@pytest.mark.parametrize("case, message", [
    ("empty", "train set is empty: no preference pairs to learn from"),
    ("missing", "train[0]: missing field 'rejected'"),
    ("no model", "sft_model"),
])
def test_bad_input_is_one_clear_line(case, message, tiny, tmp_path):
    train = {"empty": [], "missing": [{"prompt": "p", "chosen": "c"}], "no model": pairs(4)}[case]
    model = tmp_path / "nowhere" if case == "no model" else tiny
    with pytest.raises(DPOInputError) as info:
        train_dpo(train, [], DPOConfig(max_steps=1), model, tmp_path / "run")
    assert message in str(info.value) and "\n" not in str(info.value)
