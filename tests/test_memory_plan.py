"""The memory plan (tasks/memory_plan.py, flows/plan.py, `instructflow plan`): hand-computed figures for a
Llama-3-8B shape, the real tensors of a training step on the tiny Llama, and the CLI and run refusal."""
from __future__ import annotations

import dataclasses
import json

import pytest

from instructflow.flows.plan import gguf_model_config, hardware_for, memory_refusal, model_config
from instructflow.tasks.config import (DPOConfig, GRPOConfig, PPOConfig, RewardConfig, SFTConfig, _tiny_yaml,
                                       accelerate_config_file, accelerate_settings, load_config)
from instructflow.tasks.memory_plan import (GB, Gpu, Hardware, ModelShape, PlanError, activation_bytes, plan_stage,
                                            sharding_of, stage_memory)

from cliutil import cli

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
             "max_position_embeddings": 8192, "rms_norm_eps": 1e-5}

# Llama-3-8B by hand (h 4096, i 14336, 32 layers, 32 heads of 128, 8 kv heads -> k/v width 1024, V 128256):
#   embeddings   128256 * 4096                                   =   525,336,576
#   per layer    q 4096*4096 16,777,216 + k 4096*1024 4,194,304 + v 4,194,304 + o 16,777,216 = 41,943,040
#                + gate/up/down 3 * 4096*14336 = 176,160,768 + two RMSNorms 8,192           = 218,112,000
#   32 layers                                                    = 6,979,584,000
#   final norm 4,096; lm_head (untied) 525,336,576
#   total 525,336,576 + 6,979,584,000 + 4,096 + 525,336,576       = 8,030,261,248
PARAMS_8B = 8_030_261_248
# a sequence classifier: no lm_head, a 4096 x 1 score head: 8,030,261,248 - 525,336,576 + 4,096
CLASSIFIER_8B = 7_504_928_768
# LoRA r=16 per layer: q 16*(4096+4096) 131,072 + k 16*(4096+1024) 81,920 + v 81,920 + o 131,072
#   + gate, up 16*(4096+14336) 294,912 each + down 294,912 = 1,310,720; x 32 layers
LORA_8B = 41_943_040
# per layer linears without norms: 218,112,000 - 8,192 = 218,103,808; x 32
BLOCK_LINEARS_8B = 6_979_321_856


@pytest.fixture
def llama8b(tmp_path) -> ModelShape:
    model = tmp_path / "llama-3-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA3_8B))
    config, source = model_config(str(model))
    assert source == str(model / "config.json")
    return ModelShape.from_config(config, source)


def one_gpu(gb: float | None = 80) -> Hardware:
    return Hardware(gpus=1, memory_bytes=None if gb is None else int(gb * GB))


def test_llama3_8b_parameter_count(llama8b):
    assert llama8b.params() == PARAMS_8B
    assert llama8b.params("classifier") == CLASSIFIER_8B
    assert llama8b.lora_params(16) == LORA_8B
    assert llama8b.block_linear_params() == BLOCK_LINEARS_8B
    tied = ModelShape.from_config({**LLAMA3_8B, "tie_word_embeddings": True})
    assert tied.params() == PARAMS_8B - 525_336_576


def test_full_sft_on_one_gpu_is_16_bytes_per_parameter(llama8b):
    plan = stage_memory(SFTConfig(precision="bf16", batch_size=1, max_length=512), llama8b, one_gpu())
    parts = plan.components
    assert parts["weights"] == 32_121_044_992      # fp32 master weights: 4 * 8,030,261,248
    assert parts["gradients"] == 32_121_044_992    # fp32 gradients of every parameter: 4 B each
    assert parts["optimizer"] == 64_242_089_984    # AdamW exp_avg + exp_avg_sq: 8 B each
    assert parts["weights"] + parts["gradients"] + parts["optimizer"] == 128_484_179_968  # 16 B/param
    assert parts["reference"] == parts["reward_model"] == parts["critic"] == 0
    # activations, 1 row of 512 tokens in bf16: per layer 512*4096*(34 + 5*32*512/4096 = 20) = 113,246,208,
    # x 32 = 3,623,878,656; logits 512 * 128256 * (2 + 4 + 4) = 656,670,720
    assert parts["activations"] == 4_280_549_376
    assert plan.total_bytes == 128_484_179_968 + 4_280_549_376
    assert plan.fits is False and plan.sharding == "inprocess" and plan.trainable_params == PARAMS_8B


def test_gradient_checkpointing_keeps_each_layer_input_and_one_layer():
    shape = ModelShape.from_config(LLAMA3_8B)
    # 32 layers * 4 B (fp32 residual) * 512*4096 = 268,435,456 + one layer 113,246,208 + logits 656,670,720
    assert activation_bytes(shape, 1, 512, "bf16", checkpointing=True) == 1_038_352_384
    # fp32 activations: twice the 16-bit layers, logits 4 + 4 + 4 B
    assert activation_bytes(shape, 1, 512, "fp32", checkpointing=False) == 2 * 3_623_878_656 + 512 * 128256 * 12
    assert activation_bytes(shape, 1, 512, "bf16", checkpointing=False, causal_lm=False) == 3_623_878_656


def test_lora_r16_trains_only_the_adapters(llama8b):
    plan = stage_memory(SFTConfig(precision="bf16", lora=True, lora_r=16), llama8b, one_gpu())
    assert plan.trainable_params == LORA_8B
    assert plan.components["weights"] == 32_288_817_152   # 4 * (8,030,261,248 + 41,943,040): fp32 base + adapters
    assert plan.components["gradients"] == 167_772_160     # 4 * 41,943,040
    assert plan.components["optimizer"] == 335_544_320     # 8 * 41,943,040


def test_qlora_holds_the_block_linears_in_nf4(llama8b):
    plan = stage_memory(SFTConfig(precision="bf16", qlora=True, lora_r=16), llama8b, one_gpu())
    # NF4 with double quantisation: 0.5 + 1/64 + 4/(64*256) = 0.515869140625 B per block-linear weight:
    #   6,979,321,856 * 0.515869140625 = 3,600,416,768; the rest (embeddings, norms, lm_head) stays fp32:
    #   4 * (8,030,261,248 - 6,979,321,856) = 4,203,757,568; adapters 4 * 41,943,040 = 167,772,160
    assert plan.components["weights"] == 3_600_416_768 + 4_203_757_568 + 167_772_160
    assert plan.components["gradients"] == 167_772_160


def test_zero3_over_8_gpus_shards_everything(llama8b):
    section = SFTConfig(precision="bf16", launcher="accelerate", accelerate_config="deepspeed_zero3", num_processes=8)
    plan = stage_memory(section, llama8b, Hardware(gpus=8, memory_bytes=80 * GB))
    assert (plan.sharding, plan.processes) == ("zero3 x8", 8)
    assert plan.components["weights"] == 4_015_130_624     # 32,121,044,992 / 8
    assert plan.components["gradients"] == 4_015_130_624
    assert plan.components["optimizer"] == 8_030_261_248   # 64,242,089,984 / 8
    zero2 = stage_memory(dataclasses.replace(section, accelerate_config="deepspeed_zero2"), llama8b,
                         Hardware(gpus=8, memory_bytes=80 * GB))
    assert zero2.components["weights"] == 32_121_044_992   # ZeRO-2 keeps whole weights on each GPU
    assert (zero2.components["gradients"], zero2.components["optimizer"]) == (4_015_130_624, 8_030_261_248)
    ddp = stage_memory(dataclasses.replace(section, accelerate_config="ddp"), llama8b, Hardware(gpus=8))
    assert ddp.components["optimizer"] == 64_242_089_984 and ddp.sharding == "ddp x8"


def test_process_count_comes_from_the_section_then_the_yaml_then_the_gpus(tmp_path):
    zero3 = SFTConfig(launcher="accelerate", accelerate_config="deepspeed_zero3")
    assert sharding_of(zero3, Hardware(gpus=4)).processes == 2   # the shipped YAML says num_processes: 2
    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\n")
    assert sharding_of(dataclasses.replace(zero3, accelerate_config=str(fsdp)), Hardware(gpus=4)).label == "fsdp-full x4"
    fsdp.write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_sharding_strategy: SHARD_GRAD_OP\n")
    assert sharding_of(dataclasses.replace(zero3, accelerate_config=str(fsdp)), Hardware(gpus=4)).zero_stage == 2


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_the_small_yaml_reader_agrees_with_pyyaml_on_the_shipped_configs(name):
    text = accelerate_config_file(name).read_text()
    with_yaml = accelerate_settings(text)
    doc = _tiny_yaml(text)
    assert with_yaml["distributed_type"] == doc["distributed_type"].upper()
    assert with_yaml["num_processes"] == int(doc["num_processes"]) == 2
    assert with_yaml["zero_stage"] == (int(doc["deepspeed_config"]["zero_stage"]) if "deepspeed_config" in doc else None)


def test_ppo_holds_four_models(llama8b):
    hardware = one_gpu()
    plan = stage_memory(PPOConfig(precision="bf16"), llama8b, hardware)
    assert plan.components["reference"] == 16_060_522_496      # bf16 copy of the policy: 2 * 8,030,261,248
    assert plan.components["reward_model"] == 15_009_857_536   # bf16 classifier: 2 * 7,504,928,768
    assert plan.components["critic"] == 120_078_860_288        # trained classifier: 16 * 7,504,928,768
    fp32 = stage_memory(PPOConfig(precision="fp32"), llama8b, hardware)
    assert fp32.components["reference"] == 32_121_044_992      # frozen models stay fp32 unless bf16
    # auto on a GPU without bf16: PPO has no fp16 loss scaling, so fp32 (as models/recipe_io.resolve_precision)
    assert stage_memory(PPOConfig(), llama8b, dataclasses.replace(hardware, bf16=False)).precision == "fp32"
    assert stage_memory(SFTConfig(), llama8b, dataclasses.replace(hardware, bf16=False)).precision == "fp16"
    lora = stage_memory(PPOConfig(precision="bf16", lora=True), llama8b, hardware)
    # critic with LoRA: fp32 weights + adapters + trained score head (4096), their grads and AdamW
    assert lora.components["critic"] == 4 * CLASSIFIER_8B + 16 * (LORA_8B + 4096)
    assert lora.components["reference"] == 16_060_522_496      # still a separate copy in models/ppo.py


def test_dpo_and_grpo_extra_models(llama8b):
    hardware = one_gpu()
    assert stage_memory(DPOConfig(), llama8b, hardware).components["reference"] == 0   # precomputed log-probs
    live = stage_memory(DPOConfig(precision="bf16", precompute_ref_log_probs=False), llama8b, hardware)
    assert live.components["reference"] == 16_060_522_496 and live.rows == 2 * DPOConfig().batch_size
    lora = DPOConfig(precompute_ref_log_probs=False, lora=True)
    assert stage_memory(lora, llama8b, hardware).components["reference"] == 0  # adapters off = the reference
    grpo = stage_memory(GRPOConfig(precision="bf16"), llama8b, hardware)
    assert (grpo.components["reference"], grpo.components["reward_model"]) == (16_060_522_496, 15_009_857_536)
    assert stage_memory(GRPOConfig(beta=0.0), llama8b, hardware).components["reference"] == 0
    reward = stage_memory(RewardConfig(batch_size=4), llama8b, hardware)
    assert reward.params == CLASSIFIER_8B and reward.rows == 8   # chosen and rejected


def test_advice_fits_and_names_only_settings_the_stage_accepts(llama8b):
    hardware = one_gpu(80)
    plan = plan_stage(SFTConfig(precision="bf16", batch_size=16, max_length=512), llama8b, hardware)
    assert plan.fits is False and plan.advice
    assert str(plan.advice[0]).startswith("gradient_checkpointing = true, lora = true (")
    for advice in plan.advice:   # every suggestion, applied, fits (on the GPUs it names)
        changed = dataclasses.replace(SFTConfig(precision="bf16", batch_size=16, max_length=512), **dict(advice.changes))
        again = stage_memory(changed, llama8b, dataclasses.replace(hardware, gpus=advice.gpus))
        assert again.fits and again.total_bytes == advice.total_bytes
    more = [a for a in plan.advice if a.gpus > 1]
    assert more and str(more[0]).endswith(f"on {more[0].gpus} GPUs)")
    # four 8B models, the actor and critic with fp32 weights even under LoRA: nothing fits one 80 GB GPU; the
    # closest never names ZeRO or qlora (ppo runs in process and refuses qlora); batch 8 x 1 becomes 1 x 8
    ppo = plan_stage(PPOConfig(precision="bf16"), llama8b, hardware)
    assert ppo.fits is False and not ppo.advice
    assert dict(ppo.closest.changes) == {"gradient_checkpointing": True, "lora": True, "batch_size": 1, "grad_accum": 8}
    assert ppo.closest.total_bytes > 80 * GB
    on_two = plan_stage(PPOConfig(precision="bf16"), llama8b, Hardware(gpus=2, memory_bytes=200 * GB))
    assert on_two.advice and all(dict(a.changes).keys().isdisjoint({"launcher", "qlora"}) for a in on_two.advice)
    assert plan_stage(SFTConfig(), llama8b, one_gpu(None)).fits is None   # no memory given: no verdict


def test_a_config_that_is_not_llama_shaped_is_one_line(tmp_path):
    with pytest.raises(PlanError, match="not a Llama-shaped config .*intermediate_size"):
        ModelShape.from_config({"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "vocab_size": 9})
    with pytest.raises(PlanError, match="no config.json"):
        model_config(str(tmp_path / "nowhere"))


def test_tiny_before_it_is_built_is_models_tiny_shape_with_the_bundled_vocabulary(tmp_path, monkeypatch):
    from instructflow.models.bundled import BUNDLED_DIR_NAME
    from instructflow.models.tiny import tiny_llama_config

    monkeypatch.setenv("INSTRUCTFLOW_CACHE", str(tmp_path))   # a cache with a converted bundled dir only
    (tmp_path / BUNDLED_DIR_NAME).mkdir()
    (tmp_path / BUNDLED_DIR_NAME / "config.json").write_text(json.dumps({**LLAMA3_8B, "vocab_size": 49152}))
    config, source = model_config("tiny")
    assert config == tiny_llama_config(49152) and source == "models/tiny.py (not built yet)"
    # 49152*64 embeddings (tied) + 2 layers * (4*64*64 + 3*64*128 + 2*64) + 64 = 3,227,968
    assert ModelShape.from_config(config).params() == 3_227_968
    bundled, source = model_config("bundled")
    assert bundled["hidden_size"] == 4096 and source == str(tmp_path / BUNDLED_DIR_NAME / "config.json")


def test_hardware_from_options_and_visible_gpus():
    assert hardware_for(None, None, [])[0] == Hardware(gpus=1, memory_bytes=None)
    visible = [Gpu("A", 40 * GB), Gpu("B", 24 * GB, bf16=False)]
    found, where = hardware_for(None, None, visible)
    assert (found.gpus, found.memory_bytes, found.bf16, found.name) == (2, 24 * GB, False, "B")
    assert hardware_for(4, 80, visible)[0].memory_bytes == 80 * GB and hardware_for(4, 80, [])[0].gpus == 4


# --- the real thing: the tensors of a training step on the tiny Llama ----------------------------

def step_bytes(model, lr: float = 1e-3) -> int:
    """Bytes of the parameters, their gradients and AdamW's state after one real step."""
    import torch

    params = [p for p in model.parameters()]
    trainable = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    ids = torch.randint(0, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    size = sum(p.numel() * p.element_size() for p in params)
    size += sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    size += sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                if torch.is_tensor(t))
    return size


@pytest.mark.slow  # ~12 s on 2 busy cores: transformers, peft and three tiny models
def test_plan_matches_the_tensors_of_a_real_adamw_step_on_the_tiny_llama():
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from instructflow.flows.teacher import local_model_dir
    from instructflow.models.recipe_io import lora_config

    from instructflow.models.tiny import tiny_llama_config

    model_dir = local_model_dir("tiny")
    config = json.loads((model_dir / "config.json").read_text())
    assert {key: config[key] for key in tiny_llama_config(1)} == tiny_llama_config(config["vocab_size"])
    shape = ModelShape.from_config(config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == shape.params()
    planned = stage_memory(SFTConfig(), shape, Hardware())
    held = step_bytes(model)
    assert abs(held - sum(planned.components[c] for c in ("weights", "gradients", "optimizer"))) <= 0.1 * held

    section = SFTConfig(lora=True, lora_r=8)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                          lora_config(section, "CAUSAL_LM"))
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == shape.lora_params(8)
    planned = stage_memory(section, shape, Hardware())
    held = step_bytes(lora)
    assert abs(held - sum(planned.components[c] for c in ("weights", "gradients", "optimizer"))) <= 0.1 * held

    classifier = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    assert sum(p.numel() for p in classifier.parameters()) == shape.params("classifier")


@pytest.mark.slow  # the GGUF reader parses 49K tokens and 49K merges: ~5 s
def test_the_bundled_gguf_header_gives_the_converted_config():
    from instructflow.flows.teacher import local_model_dir
    from instructflow.models.bundled import bundled_gguf_path

    converted = json.loads((local_model_dir("bundled") / "config.json").read_text())
    from_header = gguf_model_config(bundled_gguf_path())
    for key, value in from_header.items():
        assert converted[key] == value, key
    assert ModelShape.from_config(from_header).params() == ModelShape.from_config(converted).params() == 134_515_008


# --- the CLI and the check before a run ----------------------------------------------------------

def test_plan_json_lists_every_enabled_stage():
    out = cli("plan", "--profile", "tiny", "--gpus", "1", "--gpu-memory-gb", "80", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert list(report["stages"]) == ["sft", "reward", "ppo", "dpo", "grpo"] and report["fits"] is True
    sft = report["stages"]["sft"]
    assert sft["fits"] is True and sft["total_bytes"] == sum(sft["bytes"].values()) and sft["gpu_memory_gb"] == 80


def test_plan_says_when_nothing_fits_and_refuses_bad_input(tmp_path):
    config = tmp_path / "plan.toml"
    config.write_text("[profiles.t]\ninherits = 'tiny'\nmethods = ['ppo', 'dpo', 'grpo']\n")
    out = cli("plan", "--config", str(config), "--profile", "t", "--gpus", "1", "--gpu-memory-gb", "0.001", "--json")
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    assert list(report["stages"]) == ["sft", "reward", "ppo", "dpo", "grpo"] and report["fits"] is False
    assert all(stage["fits"] is False and not stage["advice"] and stage["closest"] for stage in report["stages"].values())
    text = cli("plan", "--config", str(config), "--profile", "t", "--gpus", "1", "--gpu-memory-gb", "0.001")
    assert text.returncode == 1 and "over 0.0 GB" in text.stdout and "no setting tried makes it fit" in text.stdout
    for args, message in ((["--gpus", "0"], "--gpus must be >= 1"),
                          (["--gpu-memory-gb", "-1"], "--gpu-memory-gb must be > 0"),
                          (["--profile", "nope"], "unknown profile 'nope'")):
        bad = cli("plan", "--gpus", "1", *args)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_the_run_check_refuses_a_stage_that_cannot_fit_the_visible_gpu(tmp_path, llama8b):
    config = tmp_path / "big.toml"
    config.write_text(f"[profiles.big]\ninherits = 'gpu'\n[profiles.big.sft]\nbase_model = '{tmp_path / 'llama-3-8b'}'\n")
    cfg = load_config("big", config)
    h100 = [Gpu("NVIDIA H100 80GB HBM3", 85_029_158_912)]
    line = memory_refusal(cfg, ["sft", "preferences"], h100)
    assert line.startswith("memory plan: sft needs ") and "but NVIDIA H100 80GB HBM3 has 79.2 GB" in line
    assert "fits with: gradient_checkpointing = true, lora = true (" in line and "\n" not in line
    assert "also over" not in line                               # only the stages asked for
    assert "also over: reward" in memory_refusal(cfg, ["generate", "sft", "reward"], h100)
    assert memory_refusal(cfg, ["sft"], []) is None              # CPU: no check
    assert memory_refusal(cfg, ["generate", "filter"], h100) is None
    assert memory_refusal(cfg, ["sft", "reward"], [Gpu("big", 1024 * GB)]) is None
