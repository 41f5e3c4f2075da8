"""train_ppo with real TRL PPO on tiny Llamas: saved (policy, value) rounds, exact resume, learning, bad input.

The models are built by hand so that a few CPU updates show learning:

* reward: a LlamaForSequenceClassification from the tiny Llama whose attention and MLP output
  projections are zeroed, so the last hidden state is norm(embedding of the last token), and whose
  score head is that of the token " yes": the score is 4.0 when a reply ends in " yes" and between
  about -1 and +1 for the other candidate words.
* policy: the tiny Llama with an untied output head that puts nearly all probability on eight
  candidate words (" yes", " no", " red", ...). A random tiny Llama spreads over 49k tokens and
  would almost never sample " yes"; this one samples it about one time in eight, so PPO sees the
  reward and can move probability towards it.
"""
from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification

from instructflow.models.ppo import PPOInputError, last_complete_round, train_ppo
from instructflow.models.sampling import generate_responses
from instructflow.tasks.config import ConfigError, PPOConfig
from recipe_helpers import favouring_policy, last_token_reward, tiny_llama

WORDS = [" yes", " no", " red", " blue", " cat", " dog", " one", " two"]
PROMPTS = [f"<|im_start|>user\nQuestion {i}: pick a word.<|im_end|>\n<|im_start|>assistant\n" for i in range(16)]
STEP_KEYS = {"reward", "rlhf_reward", "kl", "entropy", "policy_loss", "value_loss", "clipfrac", "ratio", "approxkl",
             "episodes"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """(policy dir, reward dir) as described in the module docstring."""
    root = tmp_path_factory.mktemp("ppo-models")
    tiny = tiny_llama(root)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    words = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in WORDS]
    assert all(len(ids) == 1 for ids in words)
    words = [ids[0] for ids in words]

    return favouring_policy(tiny, words, root / "policy"), last_token_reward(tiny, root / "reward", words[0])


def settings(policy: Path, reward: Path, out: Path, **overrides) -> dict:
    """train_ppo's keyword arguments: the ppo section, the policy and reward models, the output dir."""
    base = dict(total_episodes=16, batch_size=4, num_ppo_epochs=1, response_length=4, learning_rate=1e-3,
                save_every_steps=2, seed=7)
    return {"cfg": PPOConfig(**{**base, **overrides}), "policy_model": policy, "reward_model": reward,
            "output_dir": out}


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.slow
def test_rounds_save_policy_and_value_and_a_crashed_run_resumes_exactly(models, tmp_path):
    policy_dir, reward_dir = models

    # 1. uninterrupted: 4 updates of 4 episodes, a round every 2 updates (kept: keep_checkpoints)
    seen: list[tuple[int, dict]] = []
    result = train_ppo(PROMPTS, **settings(policy_dir, reward_dir, tmp_path / "a", keep_checkpoints=True),
                       on_step=lambda s, m: seen.append((s, m)))
    assert [s for s, _ in seen] == [1, 2, 3, 4]
    assert all(STEP_KEYS <= m.keys() and all(isinstance(v, float) for v in m.values()) for _, m in seen)
    assert [m["episodes"] for _, m in seen] == [4.0, 8.0, 12.0, 16.0]
    assert all(0.5 < m["ratio"] < 1.5 for _, m in seen)
    assert result["steps"] == 4 and result["episodes"] == 16 and result["resumed_from"] is None
    assert result["reward_first"] == seen[0][1]["reward"] and result["reward_last"] == seen[-1][1]["reward"]
    assert result["kl_last"] == seen[-1][1]["kl"] and result["skipped_prompts"] == 0
    assert result["episodes_per_s"] > 0 and result["wall_s"] > 0 and Path(result["plot"]).stat().st_size > 0

    rounds = tmp_path / "a" / "rounds"
    # the last round became final/ (renamed, not copied: no second copy of it), no temp dirs left
    assert sorted(p.name for p in rounds.iterdir()) == ["round-000002"]
    assert Path(result["policy_checkpoint"]).parent == tmp_path / "a" / "final"
    assert json.loads((tmp_path / "a" / "final" / "state.json").read_text())["global_step"] == 4
    state = json.loads((rounds / "round-000002" / "state.json").read_text())
    assert state["global_step"] == 2 and state["episodes"] == 8 and state["seed"] == 7
    assert [h["step"] for h in state["history"]] == [1, 2]
    # one AdamW for the whole run: its state is kept with the newest round only (round 2 dropped it when
    # round 4 was saved; see the crash below for the newest), the LR decays over all 4 updates; final/ has none
    assert not (rounds / "round-000002" / "optimizer.pt").exists()
    assert not (Path(result["policy_checkpoint"]).parent / "optimizer.pt").exists()
    assert [m["lr"] for _, m in seen] == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])

    final_policy = AutoModelForCausalLM.from_pretrained(result["policy_checkpoint"])
    final_value = LlamaForSequenceClassification.from_pretrained(result["value_checkpoint"])
    assert AutoTokenizer.from_pretrained(result["policy_checkpoint"]).pad_token == "<|endoftext|>"
    assert not torch.equal(weights(final_policy), weights(AutoModelForCausalLM.from_pretrained(policy_dir)))
    assert not torch.equal(weights(final_value), weights(LlamaForSequenceClassification.from_pretrained(reward_dir)))
    round_2 = LlamaForSequenceClassification.from_pretrained(rounds / "round-000002" / "value")
    assert not torch.equal(weights(round_2), weights(final_value))  # each round is its own snapshot

    # 2. the same run crashing during update 3 (after round 2 was saved) ...
    def crash_at_3(step: int, metrics: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        train_ppo(PROMPTS, **settings(policy_dir, reward_dir, tmp_path / "b"), on_step=crash_at_3)
    assert [p.name for p in (tmp_path / "b" / "rounds").iterdir()] == ["round-000002"]
    assert (tmp_path / "b" / "rounds" / "round-000002" / "optimizer.pt").is_file()  # the newest round's: exact resume
    assert not (tmp_path / "b" / "final").exists()

    # 3. ... and rerun: continues at step 3 from round 2, replaying exactly what the uninterrupted run did
    resumed: list[tuple[int, dict]] = []
    again = train_ppo(PROMPTS, **settings(policy_dir, reward_dir, tmp_path / "b"),
                      on_step=lambda s, m: resumed.append((s, m)))
    assert again["resumed_from"] == str(tmp_path / "b" / "rounds" / "round-000002")
    assert [s for s, _ in resumed] == [3, 4]
    assert again["steps"] == 4 and again["episodes"] == 16 and again["updates_this_run"] == 2
    assert again["reward_first"] == seen[0][1]["reward"]  # history survives in state.json
    for (_, want), (_, got) in zip(seen[2:], resumed):
        want, got = (dict(m, episodes_per_s=0.0) for m in (want, got))  # wall-clock, not training
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert torch.allclose(weights(AutoModelForCausalLM.from_pretrained(again["policy_checkpoint"])),
                          weights(final_policy), atol=1e-6)
    # finished (keep_checkpoints is false): no rounds left, final/ holds the policy and its metrics; the
    # critic, which only a resume reads, went with the rounds
    assert not (tmp_path / "b" / "rounds").exists() and again["value_checkpoint"] is None
    assert sorted(p.name for p in (tmp_path / "b" / "final").iterdir()) == ["metrics.json", "policy", "state.json"]

    # 4. a third call has nothing left to do: it returns the stored result without loading a model
    done = train_ppo(PROMPTS, **settings(policy_dir, reward_dir, tmp_path / "b"), on_step=crash_at_3)
    assert done["reused"] is True and done["steps"] == 4 and done["episodes"] == 16
    assert done["reward_last"] == again["reward_last"] and done["policy_checkpoint"] == again["policy_checkpoint"]
    # other prompts in the same folder are another job: refused, not mixed up
    with pytest.raises(PPOInputError, match="trained with other settings or data"):
        train_ppo(PROMPTS[:8], **settings(policy_dir, reward_dir, tmp_path / "b"))


@pytest.mark.slow
def test_policy_learns_to_end_with_the_rewarded_word(models, tmp_path):
    policy_dir, reward_dir = models
    rewards: list[float] = []
    result = train_ppo(PROMPTS, **settings(policy_dir, reward_dir, tmp_path / "run", total_episodes=48, batch_size=8,
                                         num_ppo_epochs=4, response_length=2, learning_rate=3e-3,
                                         save_every_steps=3, seed=3),
                       on_step=lambda s, m: rewards.append(m["reward"]))
    assert len(rewards) == 6
    # reward ~ -0.4 at the start (1 in 8 replies ends in " yes"; -1 missing-eos penalty), 3.0 at best
    assert statistics.fmean(rewards[-2:]) > statistics.fmean(rewards[:2]) + 0.25, rewards

    def yes_rate(model_dir) -> float:
        replies = [r for rs in generate_responses(model_dir, PROMPTS[:4], k=16, max_new_tokens=2, seed=0) for r in rs]
        return sum(r.endswith("yes") for r in replies) / len(replies)

    # ~0.17 before; 0.56-0.73 after for seeds 1-6 of this setup
    assert yes_rate(result["policy_checkpoint"]) > yes_rate(policy_dir) + 0.2


@pytest.mark.slow
def test_value_warmup_trains_only_the_critic_first(models, tmp_path):
    policy_dir, reward_dir = models
    seen: list[dict] = []
    result = train_ppo(PROMPTS, **settings(policy_dir, reward_dir, tmp_path / "w", total_episodes=12,
                                         save_every_steps=1, value_warmup_updates=1, keep_checkpoints=True),
                       on_step=lambda s, m: seen.append(m))
    assert result["steps"] == 3
    # the actor's rate (the first group's, as TRL logs it) is 0 for the warm-up, then decays over the 2 policy updates
    assert [m["lr"] for m in seen] == pytest.approx([0.0, 1e-3, 0.5e-3])
    rounds = tmp_path / "w" / "rounds"
    initial_policy = weights(AutoModelForCausalLM.from_pretrained(policy_dir))
    initial_value = weights(LlamaForSequenceClassification.from_pretrained(reward_dir))
    warmed_value = weights(LlamaForSequenceClassification.from_pretrained(rounds / "round-000001" / "value"))
    assert torch.equal(weights(AutoModelForCausalLM.from_pretrained(rounds / "round-000001" / "policy")), initial_policy)
    assert not torch.equal(warmed_value, initial_value)
    assert not torch.equal(weights(AutoModelForCausalLM.from_pretrained(result["policy_checkpoint"])), initial_policy)


@pytest.mark.slow
def test_lora_with_gradient_checkpointing_saves_merged_plain_models(models, tmp_path):
    policy_dir, reward_dir = models
    result = train_ppo(PROMPTS[:3], **settings(policy_dir, reward_dir, tmp_path / "lora", total_episodes=8,
                                             save_every_steps=1, lora=True, lora_r=4, gradient_checkpointing=True,
                                             precision="bf16", keep_rounds=1, keep_checkpoints=True))
    assert result["steps"] == 2 and result["prompts_used"] == 3  # 3 prompts are repeated to fill a batch of 4
    # keep_rounds=1 pruned round 1 when round 2 was saved; round 2 became final/
    assert [p.name for p in (tmp_path / "lora" / "rounds").iterdir()] == []
    for kind, cls, initial in (("policy", LlamaForCausalLM, policy_dir), ("value", LlamaForSequenceClassification,
                                                                         reward_dir)):
        saved = Path(result[f"{kind}_checkpoint"])
        assert not (saved / "adapter_config.json").exists()
        assert not any("lora" in key for key in json.dumps(json.loads((saved / "config.json").read_text())))
        trained, before = cls.from_pretrained(saved), cls.from_pretrained(initial)
        assert weights(trained).shape == weights(before).shape and not torch.equal(weights(trained), weights(before))


def test_last_complete_round_ignores_partial_rounds(tmp_path):
    def fake_round(name: str, step: int, complete: bool = True) -> None:
        for part in ("policy", "value"):
            (tmp_path / name / part).mkdir(parents=True)
            (tmp_path / name / part / "config.json").write_text("{}")
        if complete:
            (tmp_path / name / "state.json").write_text(json.dumps({"global_step": step, "episodes": step * 4}))

    assert last_complete_round(tmp_path) is None
    fake_round("round-000002", 2)
    fake_round("round-000004", 4)
    fake_round("round-000006", 6, complete=False)  # crashed before state.json
    fake_round(".round-000008.tmp-x", 8)  # crashed before the rename
    found = last_complete_round(tmp_path)
    assert found.step == 4 and found.episodes == 16 and found.path == tmp_path / "round-000004"


@pytest.mark.slow
def test_bad_input_raises_ppo_input_error_naming_the_field(models, tmp_path):
    policy_dir, reward_dir = models
    with pytest.raises(PPOInputError, match="reward_model .* is not a model dir"):
        train_ppo(PROMPTS, **settings(policy_dir, tmp_path / "missing", tmp_path / "out"))
    with pytest.raises(PPOInputError, match="none of the 0 prompts"):
        train_ppo([], **settings(policy_dir, reward_dir, tmp_path / "out"))
    with pytest.raises(PPOInputError, match="none of the 2 prompts .*max_prompt_length=3"):
        train_ppo(PROMPTS[:2], **settings(policy_dir, reward_dir, tmp_path / "out", max_prompt_length=3))
    # a bad setting never reaches train_ppo: the section refuses it when it is built (tasks/config.py)
    with pytest.raises(ConfigError, match=r"ppo.total_episodes must be a multiple of .* \(= 4\), got 10"):
        settings(policy_dir, reward_dir, tmp_path / "out", total_episodes=10)
    with pytest.raises(ConfigError, match="ppo.precision must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        settings(policy_dir, reward_dir, tmp_path / "out", precision="fp8")

    pads_with_eos = tmp_path / "pads-with-eos"
    shutil.copytree(policy_dir, pads_with_eos)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(pads_with_eos)
    with pytest.raises(PPOInputError, match="pads with eos"):
        train_ppo(PROMPTS, **settings(pads_with_eos, reward_dir, tmp_path / "out"))

    other_vocab = tmp_path / "other-vocab"
    shutil.copytree(reward_dir, other_vocab)
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    tokenizer.add_tokens(["<|brand-new|>"])
    tokenizer.save_pretrained(other_vocab)
    with pytest.raises(PPOInputError, match="reward_model .* tokenizer differs"):
        train_ppo(PROMPTS, **settings(policy_dir, other_vocab, tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing was started
