"""Long sequences: RoPE scaling (position interpolation) in every recipe and in the saved config, the attention
kernel setting (flash_attention_2 refused where the machine lacks it), packing measured, the memory plan."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructflow.tasks.config import (PACKING_EXACT, SECTION_CLASSES, ConfigError, SFTConfig, TrainingConfig,
                                       load_config)
from instructflow.tasks.memory_plan import Hardware, ModelShape, activation_bytes, stage_memory

COLORS = ["red", "green", "blue", "yellow", "black", "white", "pink", "gray"]
CONTEXT = 64                                    # the tiny Llama's max_position_embeddings
TRAINING_SECTIONS = [name for name, cls in SECTION_CLASSES.items() if issubclass(cls, TrainingConfig)]


# ----------------------------------------------------------------------------------------------
# Settings (no torch)

def test_every_training_section_takes_the_attention_and_rope_keys_and_their_rules(tmp_path):
    assert TRAINING_SECTIONS == ["sft", "reward", "ppo", "dpo", "grpo"]
    for name in TRAINING_SECTIONS:
        section = SECTION_CLASSES[name](attn_implementation="eager", rope_scaling_type="yarn", rope_scaling_factor=4)
        assert (section.attn_implementation, section.rope_scaling_type, section.rope_scaling_factor) == \
            ("eager", "yarn", 4.0)
    # refused when the config loads, one line naming the file and the key
    for body, message in [
            ('rope_scaling_type = "linear"\nrope_scaling_factor = 1',
             "sft.rope_scaling_factor must be > 1 with rope_scaling_type = 'linear' (1 stretches nothing), got 1.0"),
            ("rope_scaling_factor = 2", "sft.rope_scaling_factor must be 1 with rope_scaling_type = 'none'"),
            ("rope_scaling_factor = 0.5", "sft.rope_scaling_factor must be >= 1, got 0.5"),
            ('rope_scaling_type = "ntk"', "sft.rope_scaling_type must be one of none, linear, dynamic, yarn"),
            ('attn_implementation = "flash_attention_2"\nprecision = "fp32"',
             "sft.attn_implementation must be 'sdpa' or 'eager' with precision = 'fp32'"),
            ('attn_implementation = "flash_attention_3"', "sft.attn_implementation must be one of sdpa, eager, "
                                                          "flash_attention_2")]:
        path = tmp_path / "instructflow.toml"
        path.write_text(f'[profiles.mine]\ninherits = "tiny"\n[profiles.mine.sft]\n{body}\n')
        with pytest.raises(ConfigError) as refused:
            load_config("mine", path)
        assert str(refused.value).startswith(f"{path}: profiles.mine.{message}") and "\n" not in str(refused.value)
    loaded = load_config("tiny")
    assert all((getattr(loaded, name).attn_implementation, getattr(loaded, name).rope_scaling_type)
               == ("sdpa", "none") for name in TRAINING_SECTIONS)
    # flash_attention_2 is allowed by the config (auto resolves to bf16 on a GPU); the machine decides, below
    assert SFTConfig(attn_implementation="flash_attention_2", packing=True).packing
    assert set(PACKING_EXACT) == set(SECTION_CLASSES["sft"].__dataclass_fields__["attn_implementation"]
                                     .metadata["choices"])  # each one is shown exact below, or refused with packing


def test_the_activation_estimate_follows_the_attention_kernel_and_the_scaled_context():
    shape = ModelShape(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
    h, layers, s = 4096, 32, 16384
    # Korthikanti et al.: b*s*h*(34 + 5*a*s/h) per layer in 16 bit; FlashAttention keeps no s x s matrix
    sdpa = activation_bytes(shape, 1, s, "bf16", checkpointing=False, causal_lm=False)
    flash = activation_bytes(shape, 1, s, "bf16", checkpointing=False, causal_lm=False, attention="flash_attention_2")
    assert sdpa == layers * s * h * (34 + 5 * 32 * s / h) and flash == layers * s * h * 34
    assert sdpa > 5 * flash  # at 16k tokens the scores dominate
    # a doubled context through RoPE scaling is just a longer s; the plan notes a length past what the model reaches
    hardware = Hardware(gpus=1, memory_bytes=80 * 2**30)
    plain = stage_memory(SFTConfig(max_length=s, batch_size=1, precision="bf16"), shape, hardware)
    scaled = stage_memory(SFTConfig(max_length=s, batch_size=1, precision="bf16", rope_scaling_type="linear",
                                    rope_scaling_factor=2, attn_implementation="flash_attention_2"), shape, hardware)
    assert plain.seq_len == scaled.seq_len == s
    assert plain.components["activations"] - scaled.components["activations"] == sdpa - flash
    assert plain.notes == ("sequence length 16384 is over the model's max_position_embeddings 8192",)
    assert scaled.notes == ()
    too_long = stage_memory(SFTConfig(max_length=s + 1, batch_size=1, precision="bf16", rope_scaling_type="linear",
                                      rope_scaling_factor=2), shape, hardware)
    assert too_long.notes == ("sequence length 16385 is over the model's max_position_embeddings 8192 x "
                              "rope_scaling_factor 2",)


def test_the_plan_shows_the_kernel_and_later_stages_reach_as_far_as_the_scaled_sft_model(tmp_path):
    """`instructflow plan`: each stage's attention kernel and RoPE scaling; a later stage with rope_scaling_type
    "none" loads the SFT result, whose config.json carries the SFT scaling, so its longer max_length is no note."""
    from cliutil import cli

    config = tmp_path / "plan.toml"
    config.write_text('[profiles.t]\ninherits = "tiny"\nmethods = ["dpo"]\n'
                      '[profiles.t.sft]\nmax_length = 1024\nrope_scaling_type = "linear"\nrope_scaling_factor = 2\n'
                      'attn_implementation = "flash_attention_2"\nprecision = "bf16"\n'
                      '[profiles.t.reward]\nmax_length = 1024\n[profiles.t.dpo]\nmax_length = 1100\n')
    out = cli("plan", "--config", str(config), "--profile", "t", "--gpus", "1", "--gpu-memory-gb", "80", "--json")
    assert out.returncode == 0, out.stderr
    stages = json.loads(out.stdout)["stages"]
    assert [(name, p["attn_implementation"], p["rope_scaling"], p["seq_len"]) for name, p in stages.items()] == [
        ("sft", "flash_attention_2", "linear x2", 1024), ("reward", "sdpa", "linear x2", 1024),
        ("dpo", "sdpa", "linear x2", 1100)]
    assert stages["sft"]["notes"] == stages["reward"]["notes"] == []  # the tiny Llama has 512 positions, x2
    assert stages["dpo"]["notes"] == ["sequence length 1100 is over the model's max_position_embeddings 512 x "
                                      "rope_scaling_factor 2"]
    text = cli("plan", "--config", str(config), "--profile", "t", "--gpus", "1", "--gpu-memory-gb", "80")
    assert "sft · full · bf16 · 4 x 1024 tokens · RoPE linear x2 · flash_attention_2 · inprocess" in text.stdout
    assert "no s x s scores (flash_attention_2)" in text.stdout


# ----------------------------------------------------------------------------------------------
# The recipes on a tiny Llama of 64 positions (CPU)

@pytest.fixture(scope="module")
def short_llama(tmp_path_factory) -> Path:
    """A tiny Llama that has positions for 64 tokens, with large weights so that a token's position changes
    the loss visibly (at the default init attention is nearly uniform)."""
    from recipe_helpers import context_sensitive_llama, tiny_llama

    root = tmp_path_factory.mktemp("long")
    return context_sensitive_llama(tiny_llama(root, max_position_embeddings=CONTEXT), root / "sharp")


@pytest.fixture(scope="module")
def long_rows(short_llama) -> list[dict]:
    """Prompt/completion rows of 46 to 107 tokens, mixed: most are longer than the model's 64 positions."""
    from transformers import AutoTokenizer

    from instructflow.tasks.sft_data import InstructionExample, to_prompt_completion

    tokenizer = AutoTokenizer.from_pretrained(short_llama)
    return [to_prompt_completion(InstructionExample(f"Name the first color of list {i}.",
                                                    " ".join(COLORS[(i + j) % 8] for j in range(i * 7 % 46)),
                                                    f"The color is {COLORS[i % 8]}.", "seed"), "alpaca", tokenizer)
            for i in range(26)]


def sft_section(**overrides) -> SFTConfig:
    values = dict(max_length=2 * CONTEXT, max_steps=3, learning_rate=1e-3, batch_size=4, warmup_ratio=0.0,
                  lr_scheduler="constant", eval_steps=100, save_steps=100, seed=0, rope_scaling_type="linear",
                  rope_scaling_factor=2.0)
    return SFTConfig(**{**values, **overrides})


def token_counts(tokenizer, rows: list[dict]) -> list[int]:
    return [len(tokenizer(text=row["prompt"] + row["completion"])["input_ids"]) for row in rows]


@pytest.fixture(scope="module")
def scaled_sft(short_llama, long_rows, tmp_path_factory) -> dict:
    from instructflow.models.sft import train_sft

    return train_sft(long_rows[:22], long_rows[22:], sft_section(), short_llama,
                     tmp_path_factory.mktemp("sft") / "run")


@pytest.mark.slow
def test_sft_trains_at_twice_the_context_saves_the_scaling_and_the_model_reloads_and_generates(
        short_llama, long_rows, scaled_sft):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructflow.models.sampling import generate_responses, greedy_replies
    from recipe_helpers import completion_loss

    tokenizer = AutoTokenizer.from_pretrained(short_llama)
    lengths = token_counts(tokenizer, long_rows)
    assert max(lengths) <= 2 * CONTEXT and sum(n > CONTEXT for n in lengths[22:]) >= 3  # long eval rows, uncut
    metrics = scaled_sft
    assert metrics["truncated_examples"] == 0 and metrics["steps"] == 3

    final = Path(metrics["checkpoint"])
    saved = json.loads((final / "config.json").read_text())
    # transformers 5.x writes `rope_parameters` (the old `rope_scaling` is a deprecated alias of it)
    assert saved["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert saved["max_position_embeddings"] == CONTEXT and "_attn_implementation" not in saved
    model = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(short_llama)
    assert torch.allclose(model.model.rotary_emb.inv_freq, base.model.rotary_emb.inv_freq / 2)

    # the trainer's held-out loss is the loss of the reloaded model, position for position: it trained with the
    # scaling it saved. The same weights without the scaling give another loss, so the check can tell
    reloaded = completion_loss(final, long_rows[22:])
    assert metrics["eval_loss_after"] == pytest.approx(reloaded, rel=1e-3)
    unscaled = completion_loss(final, long_rows[22:], rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert abs(unscaled - reloaded) > 1e-2 * reloaded

    # what later stages, evaluate and the teacher server do: load the dir as saved, here past 64 tokens
    prompts = [row["prompt"] for row in long_rows[22:]]
    assert max(len(tokenizer(text=p)["input_ids"]) for p in prompts) > CONTEXT
    replies = greedy_replies(final, prompts, max_new_tokens=12)
    assert all(reply.tokens >= 1 for reply in replies)
    sampled = generate_responses(final, prompts[:2], k=2, max_new_tokens=12, seed=1)
    assert [len(samples) for samples in sampled] == [2, 2]


@pytest.mark.slow
def test_a_later_stage_keeps_the_saved_scaling_or_sets_its_own_and_references_get_it_too(
        short_llama, long_rows, scaled_sft, tmp_path):
    from instructflow.models.dpo import train_dpo
    from instructflow.models.grpo import train_grpo
    from instructflow.models.ppo import train_ppo
    from instructflow.models.reward import score_each, train_reward
    from instructflow.tasks.config import DPOConfig, GRPOConfig, PPOConfig, RewardConfig

    sft_model = Path(scaled_sft["checkpoint"])
    pairs = [{"prompt": row["prompt"], "chosen": row["completion"].split("<")[0],
              "rejected": f"The color is {COLORS[(i + 3) % 8]}."} for i, row in enumerate(long_rows[:8])]
    common = dict(max_steps=1, batch_size=4, learning_rate=1e-4, warmup_ratio=0.0, eval_steps=100, save_steps=100,
                  max_length=2 * CONTEXT, seed=0)
    # rope_scaling_type "none": the reward model keeps what the SFT model's config.json says
    reward = train_reward(pairs[:4], pairs[4:], RewardConfig(**common), sft_model, tmp_path / "reward")
    saved = json.loads((Path(reward["checkpoint"]) / "config.json").read_text())
    assert saved["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert len(score_each(reward["checkpoint"], [p["prompt"] for p in pairs], [p["chosen"] for p in pairs])[0]) == 8

    # DPO from the unscaled base with its own scaling and no precomputed log-probs: TRL loads the reference
    # itself, with model_init_kwargs. Policy and reference are one model before the first update, so the
    # implicit rewards of the first step are 0 exactly when both read the long pairs at the same positions
    logged: list[tuple[int, dict]] = []
    dpo = train_dpo(pairs[:4], pairs[4:], DPOConfig(**common, precompute_ref_log_probs=False,
                                                    rope_scaling_type="linear", rope_scaling_factor=2.0, keep_checkpoints=True),
                    short_llama, tmp_path / "dpo", on_step=lambda step, values: logged.append((step, values)))
    first = next(values for step, values in logged if step == 1 and "rewards/chosen" in values)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    saved = json.loads((Path(dpo["checkpoint"]) / "config.json").read_text())
    assert saved["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}

    # GRPO the same way (beta > 0: TRL loads its reference): the KL of the first step is 0 exactly
    logged.clear()
    prompts = [row["prompt"] for row in long_rows if len(row["prompt"]) > 200][:2]
    grpo = train_grpo(prompts, GRPOConfig(max_steps=1, batch_size=2, num_generations=2, max_completion_length=4,
                                          max_length=2 * CONTEXT, beta=0.04, learning_rate=1e-4, warmup_ratio=0.0,
                                          eval_steps=100, save_steps=100, seed=0, rope_scaling_type="linear",
                                          rope_scaling_factor=2.0),
                      short_llama, Path(reward["checkpoint"]), tmp_path / "grpo",
                      on_step=lambda step, values: logged.append((step, values)))
    assert grpo["prompts_used"] == 2 and logged[0][0] == 1
    assert logged[0][1]["kl"] == pytest.approx(0.0, abs=1e-6)
    saved = json.loads((Path(grpo["checkpoint"]) / "config.json").read_text())
    assert saved["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}

    # PPO loads its four models itself (actor, reference, reward model, critic): the KL of the first update is 0
    # exactly, and the policy and value it saves carry the scaling
    logged.clear()
    ppo = train_ppo(prompts, PPOConfig(total_episodes=2, batch_size=2, num_ppo_epochs=1, response_length=4,
                                       max_prompt_length=2 * CONTEXT, learning_rate=1e-4, seed=0,
                                       rope_scaling_type="linear", rope_scaling_factor=2.0, keep_checkpoints=True),
                    short_llama, Path(reward["checkpoint"]), tmp_path / "ppo",
                    on_step=lambda step, values: logged.append((step, values)))
    assert ppo["steps"] == 1 and logged[0][0] == 1
    assert logged[0][1]["kl"] == pytest.approx(0.0, abs=1e-4)  # sampled vs recomputed log-probs: ~1e-6 apart
    for checkpoint in (ppo["policy_checkpoint"], ppo["value_checkpoint"]):
        saved = json.loads((Path(checkpoint) / "config.json").read_text())
        assert saved["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}


@pytest.mark.slow
def test_the_stage_kwargs_set_the_scaling_once_keep_yarns_original_length_and_refuse_a_pretrained_rope(
        short_llama, scaled_sft, tmp_path):
    from transformers import AutoConfig

    from instructflow.models.recipe_io import model_kwargs
    from instructflow.models.sft import SFTInputError

    linear = sft_section()
    expected = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert model_kwargs(short_llama, linear) == {"attn_implementation": "sdpa", "rope_parameters": expected}
    # a model an earlier stage scaled gets the same parameters again, not a factor of 4
    assert model_kwargs(Path(scaled_sft["checkpoint"]), linear)["rope_parameters"] == expected
    yarn = model_kwargs(Path(scaled_sft["checkpoint"]), sft_section(rope_scaling_type="yarn", rope_scaling_factor=4))
    assert yarn["rope_parameters"] == {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                       "original_max_position_embeddings": CONTEXT}
    assert model_kwargs(short_llama, SFTConfig(attn_implementation="eager")) == {"attn_implementation": "eager"}

    config = AutoConfig.from_pretrained(short_llama)
    config.rope_parameters = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    config.save_pretrained(tmp_path / "llama3")
    with pytest.raises(SFTInputError, match=r"^sft.rope_scaling_type = 'linear': .* was built with rope_type "
                                            r"'llama3', which this would replace; keep it with rope_scaling_type "
                                            r"= 'none'$"):
        model_kwargs(tmp_path / "llama3", linear, SFTInputError)


@pytest.mark.slow
def test_flash_attention_2_is_refused_in_one_line_when_the_machine_lacks_it(short_llama, long_rows, tmp_path):
    import importlib.util

    import torch

    from instructflow.models.dpo import DPOInputError, train_dpo
    from instructflow.models.grpo import GRPOInputError, train_grpo
    from instructflow.models.ppo import PPOInputError, train_ppo
    from instructflow.models.reward import RewardInputError, train_reward
    from instructflow.models.sft import SFTInputError, train_sft
    from instructflow.tasks.config import DPOConfig, GRPOConfig, PPOConfig, RewardConfig

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn"):
        pytest.skip("this machine has CUDA and flash-attn: nothing to refuse")
    flash = {"attn_implementation": "flash_attention_2"}
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    calls = [(SFTInputError, lambda: train_sft(long_rows[:2], [], SFTConfig(**flash), short_llama, tmp_path / "s")),
             (RewardInputError, lambda: train_reward(pairs, [], RewardConfig(**flash), short_llama, tmp_path / "r")),
             (DPOInputError, lambda: train_dpo(pairs, [], DPOConfig(**flash), short_llama, tmp_path / "d")),
             (GRPOInputError, lambda: train_grpo(["p"], GRPOConfig(**flash, num_generations=2, batch_size=2),
                                                 short_llama, short_llama, tmp_path / "g")),
             (PPOInputError, lambda: train_ppo(["p"], PPOConfig(**flash, batch_size=2, total_episodes=2),
                                               short_llama, short_llama, tmp_path / "p"))]
    for error, call in calls:
        with pytest.raises(error) as refused:
            call()
        message = str(refused.value)
        assert "attn_implementation = 'flash_attention_2' needs a CUDA GPU and `pip install flash-attn`" in message
        assert message.endswith(": use 'sdpa' here") and "\n" not in message
    assert not any((tmp_path / name).exists() for name in "srdgp")  # refused before anything was written


@pytest.mark.slow
def test_packing_pads_less_measured_on_the_batches_the_trainer_computes(short_llama, long_rows, tmp_path):
    """Every token position the model computes in training, counted at its embedding layer (a forward pre-hook
    on every module, from torch itself): positions holding the pad token are padding, the rest real tokens."""
    import torch
    from transformers import AutoTokenizer

    from instructflow.models.sft import train_sft

    pad = AutoTokenizer.from_pretrained(short_llama).pad_token_id
    seen = {False: [0, 0], True: [0, 0]}           # packing -> [real tokens, pad tokens]
    counting = seen[False]

    def count(module, args):
        if isinstance(module, torch.nn.Embedding) and module.training:
            ids = args[0]
            padded = int((ids == pad).sum())
            counting[0] += ids.numel() - padded
            counting[1] += padded

    hook = torch.nn.modules.module.register_module_forward_pre_hook(count)
    runs = {}
    try:
        for packing in (False, True):
            counting = seen[packing]
            runs[packing] = train_sft(long_rows, [], sft_section(max_steps=-1, epochs=1.0, packing=packing),
                                      short_llama, tmp_path / f"packing-{packing}")
    finally:
        hook.remove()
    (real_off, pad_off), (real_on, pad_on) = seen[False], seen[True]
    total = sum(token_counts(AutoTokenizer.from_pretrained(short_llama), long_rows))
    # one epoch either way: every row's tokens once, which is also the Trainer's own count of real tokens
    assert real_off == real_on == total == runs[False]["tokens_seen"] == runs[True]["tokens_seen"]
    assert pad_off > 0.1 * total and pad_on < pad_off  # lengths 46 to 107 tokens, padded per batch of 4
    assert pad_on == 0                                  # bfd: padding-free rows
    assert runs[True]["steps"] < runs[False]["steps"]
    # the README's figure (`pytest -s tests/test_long_sequences.py -k pads_less`)
    print(f"\npacking, one epoch of {len(long_rows)} rows ({total} tokens), batch_size 4, max_length {2 * CONTEXT}: "
          f"padded {pad_off} pad of {real_off + pad_off} computed positions ({pad_off / (real_off + pad_off):.1%}) "
          f"in {runs[False]['steps']} steps; packed {pad_on} pad of {real_on + pad_on} "
          f"({pad_on / (real_on + pad_on):.1%}) in {runs[True]['steps']} steps")


@pytest.mark.slow
@pytest.mark.parametrize("attention", [a for a in PACKING_EXACT if a != "flash_attention_2"])  # CUDA only
def test_packing_is_exact_with_the_attention_kernel(attention, short_llama, long_rows, tmp_path):
    """The packed held-out loss before training is the loss of each row alone, not of rows that see each other."""
    from transformers import AutoTokenizer

    from instructflow.models.sft import train_sft
    from recipe_helpers import completion_loss

    lengths = token_counts(AutoTokenizer.from_pretrained(short_llama), long_rows)
    by_length = sorted(range(len(long_rows)), key=lambda i: lengths[i])
    short = [i for i in by_length if lengths[i] <= CONTEXT]  # any two of them share a bin of 128 tokens
    assert len(short) >= 3
    held_out, train = [long_rows[i] for i in short], [long_rows[i] for i in by_length[len(short):]]
    isolated = completion_loss(short_llama, held_out, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                       "rope_theta": 10000.0})
    leaky = completion_loss(short_llama, held_out, leak_previous_row=True,
                            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert abs(leaky - isolated) > 1e-3 * isolated  # 10x the tolerance below
    metrics = train_sft(train, held_out, sft_section(packing=True, max_steps=1,
                                                              attn_implementation=attention),
                        short_llama, tmp_path / "run")
    assert metrics["packing"] == "bfd"
    assert metrics["eval_loss_before"] == pytest.approx(isolated, rel=1e-4)
