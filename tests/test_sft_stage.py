"""The sft stage through its flow with `launcher = "accelerate"`: `accelerate launch` runs the recipe
on two processes (gloo on this CPU), the stage records the trainer's curve and the checkpoint; and a
stage run on an empty warehouse says what to run first."""
from __future__ import annotations

from pathlib import Path

import pytest

from instructflow.flows.common import data_home, warehouse_for
from instructflow.tasks.config import load_config
from instructflow.tasks.seeds import bundled_seed_dir, load_seeds
from instructflow.warehouse import queries

pytestmark = pytest.mark.slow  # starts a server, Prefect, or trains


def test_accelerate_launcher_trains_on_two_processes(home, tmp_path, prefect_api):
    from transformers import AutoModelForCausalLM

    from instructflow.flows.sft import sft_flow

    config = tmp_path / "instructflow.toml"
    config.write_text("[profiles.acc]\ninherits = 'tiny'\n[profiles.acc.sft]\nlauncher = 'accelerate'\n"
                      "accelerate_config = 'ddp'\nnum_processes = 2\nmax_steps = 4\nsave_steps = 4\neval_steps = 4\n")
    wh = warehouse_for(data_home(home))
    queries.replace_seed_tasks(wh, load_seeds([bundled_seed_dir() / "seed_tasks.jsonl"]))
    metrics = sft_flow(load_config("acc", config), str(home))

    run_dir = Path(metrics["checkpoint"]).parent
    # rank 0's steps, as the stage recorded them while the launch ran (the checkpoints are gone by now)
    epoch = wh.rows("SELECT value FROM step_metrics WHERE stage = 'sft' AND name = 'epoch' ORDER BY step DESC LIMIT 1")
    per_rank_batch = load_config("acc", config).sft.batch_size
    # 4 steps x batch x 2 ranks rows seen: the epoch fraction shows both processes trained
    assert epoch[0]["value"] == pytest.approx(4 * per_rank_batch * 2 / metrics["train_examples"], rel=0.05)
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] and metrics["world_size"] == 2
    assert not (run_dir / "checkpoints").exists()  # resume state goes once final/ is in place (rank 0, launched)
    losses = wh.rows("SELECT step, value FROM step_metrics WHERE stage = 'sft' AND name = 'loss' ORDER BY step")
    assert [r["step"] for r in losses] and losses[-1]["step"] == 4
    assert wh.latest_checkpoint("sft")["path"] == metrics["checkpoint"]
    AutoModelForCausalLM.from_pretrained(metrics["checkpoint"])


def test_sft_on_an_empty_warehouse_says_what_to_run(home, prefect_api):
    from instructflow.flows.sft import sft_flow

    data_home(home)
    with pytest.raises(ValueError, match="run `instructflow stage generate`"):
        sft_flow(load_config("tiny"), str(home))
