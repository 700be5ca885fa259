"""BC on Ray Train + DeepSpeed (2 CPU workers): token masking, ZeRO-2/3 end to end, learning, resume."""
from __future__ import annotations

import math

import pytest

from r2v.config import R2VConfig, TinyModelConfig
from r2v.data import ShardStore, shard_key

pytestmark = pytest.mark.ray

ACTIONS = ["go north", "go south", "take key", "open door", "eat apple", "look"]
ROOMS = ["kitchen", "cellar", "garden", "attic", "hall", "study"]


def step_row(i: int, room: str, action: str, split: str, actor: str = "teacher") -> dict:
    return {
        "experiment": "bc", "env": "toy", "task_id": f"t{i}", "split": split, "episode_id": f"e{i}-{split}",
        "policy": "teacher", "perturbation_seed": 0, "step": 0, "goal": f"find the treasure in the {room}",
        "observation": f"You are in the {room}. Exits lead everywhere.", "history": [], "action": action,
        "actor": actor, "admissible": list(ACTIONS),
    }


def toy_texts() -> list[str]:
    from r2v.policies.prompts import completion, prompt_from_row

    texts = []
    for r in ROOMS:
        for a in ACTIONS:
            texts.append(prompt_from_row(step_row(0, r, a, "train")) + completion(a))
    return texts * 5


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from r2v.policies.init_model import save_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "init"
    arch = TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, vocab_size=400)
    save_tiny_model(toy_texts(), arch, out, max_positions=128)
    return out


def make_cfg(tmp_path, tiny_model, zero_stage: int, **bc) -> R2VConfig:
    cfg = R2VConfig(experiment="bc", runs_dir=str(tmp_path))
    cfg.tracking.enabled = False
    cfg.model.path = str(tiny_model)
    cfg.model.max_context_tokens = 96
    cfg.bc.num_workers = 2
    cfg.bc.zero_stage = zero_stage
    cfg.bc.per_device_batch_size = 4
    cfg.bc.learning_rate = 3e-3
    for k, v in bc.items():
        setattr(cfg.bc, k, v)
    # teacher steps: room i -> ACTIONS[i], 8 copies each in train, one row per room in val, plus rows BC skips
    store = ShardStore(cfg.experiment_dir / "rollouts" / "teacher", "steps")
    rows = [step_row(i, r, ACTIONS[i], "train") for _ in range(8) for i, r in enumerate(ROOMS)]
    store.write(shard_key(split="train"), rows)
    store.write(shard_key(split="val"), [step_row(i, r, ACTIONS[i], "val") for i, r in enumerate(ROOMS)])
    store.write(shard_key(split="skip"), [step_row(0, "hall", "", "train"), step_row(1, "hall", "look", "train", "slm")])
    return cfg


def completion_logps(model, tok, cfg, pairs: list[tuple[int, str]]):
    """Per-token log-probs of each (room index, action) completion after that room's prompt, from one padded
    forward pass, masked to the completion tokens; and that mask."""
    import torch

    from r2v.policies.prompts import completion, prompt_from_row
    from r2v.train.common import encode, pad_batch, token_logps

    feats = [encode(tok, prompt_from_row(step_row(i, ROOMS[i], "", "val"), cfg.policy.history_steps), completion(a),
                    cfg.model.max_context_tokens) for i, a in pairs]
    batch = pad_batch(feats, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.isfinite(logits).all()
    return token_logps(logits, batch["input_ids"]) * batch["loss_mask"], batch["loss_mask"]


def load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def rank_actions(model_dir, cfg) -> list[bool]:
    """For every room: is the taught action the top-ranked admissible action by summed log-prob?"""
    model, tok = load(model_dir)
    return [int(completion_logps(model, tok, cfg, [(i, a) for a in ACTIONS])[0].sum(-1).argmax()) == i
            for i in range(len(ROOMS))]


def held_out_loss(model_dir, cfg) -> float:
    """Token-mean NLL of the taught actions on the val rows, as the epoch rows' `val_loss` defines it."""
    model, tok = load(model_dir)
    logps, mask = completion_logps(model, tok, cfg, list(enumerate(ACTIONS)))
    return float(-logps.sum() / mask.sum())


# ----------------------------------------------------------------------------------------- unit level
def test_examples_filter_and_mask_completion_only(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from r2v.train.bc import bc_examples
    from r2v.train.common import encode, pad_batch, rank_partition

    cfg = make_cfg(tmp_path, tiny_model, 2)
    train, val, files = bc_examples(cfg)
    assert len(train) == 48 and len(val) == 6 and len(files) == 3  # empty action and actor=slm dropped
    tok = AutoTokenizer.from_pretrained(tiny_model)
    f = encode(tok, train[0]["prompt"], train[0]["completion"], 20)  # forces left truncation
    assert len(f["input_ids"]) == 20 and f["input_ids"][-1] == tok.eos_token_id
    batch = pad_batch([f, encode(tok, "short", " look", 96)], tok.pad_token_id)
    targets = batch["input_ids"][:, 1:][batch["loss_mask"]].tolist()
    want = tok(train[0]["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    want2 = tok(" look", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert targets == want + want2  # loss only on completion tokens (incl. eos), never on prompt or padding
    # equal-sized, seeded partitions that cover every example; wrapped duplicates have weight 0
    parts = [rank_partition(7, r, 2, seed=0) for r in range(2)]
    assert len(parts[0][0]) == len(parts[1][0]) == 4
    assert sorted(i for idx, w in parts for i, x in zip(idx, w) if x) == list(range(7))


def test_ranking_term_compares_the_teacher_action_with_the_other_commands(tmp_path, tiny_model):
    import math

    import torch

    from r2v.train.bc import SFTObjective, bc_examples

    cfg = make_cfg(tmp_path, tiny_model, 2)
    train, val, _ = bc_examples(cfg)
    assert all("negatives" not in ex for ex in train)  # rank_weight 0: plain SFT examples
    for ex in val:  # held-out ranking accuracy is measured over every other admissible command
        assert sorted(ex["negatives"] + [ex["completion"]]) == sorted(f" {a}" for a in ACTIONS)
    cfg.bc.rank_weight, cfg.bc.rank_negatives = 1.0, 3
    train2, _, _ = bc_examples(cfg)
    assert [len(ex["negatives"]) for ex in train2] == [3] * len(train2)
    assert all(ex["completion"] not in ex["negatives"] for ex in train2)
    assert train2[0]["negatives"] == bc_examples(cfg)[0][0]["negatives"]  # the subset is seeded
    # [teacher, negatives...] per example, laid out as the objective's forward pass lays them out
    feats = [{"negatives": [{}, {}]}, {"negatives": []}, {"negatives": [{}]}]
    seq = torch.tensor([0.0, -3.0, -0.5, -1.0, -2.0, 0.2])  # teachers 0, -3, -0.5; then 2 + 0 + 1 negatives
    nll, first = SFTObjective._ranking(seq, feats)
    assert torch.allclose(nll, torch.tensor([math.log(1 + math.exp(-1) + math.exp(-2)),
                                             math.log(math.exp(-0.5) + math.exp(0.2)) + 0.5]))
    assert first.tolist() == [True, False]  # the example without negatives is not a ranking


def test_linear_schedule_warms_up_then_decays_to_zero():
    """The scheduler section is DeepSpeed's own WarmupDecayLR, built here from the section we emit."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    from r2v.train.deepspeed_config import train_ds_config

    assert "scheduler" not in train_ds_config(zero_stage=2, micro_batch_size=4, world_size=2)  # constant
    section = train_ds_config(zero_stage=2, micro_batch_size=4, world_size=2, learning_rate=0.01,
                              total_steps=40, warmup_ratio=0.1)["scheduler"]
    assert section["type"] == "WarmupDecayLR"
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = WarmupDecayLR(opt, **section["params"])
    lrs = []
    for _ in range(40):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    peak = lrs.index(max(lrs))
    assert 2 <= peak <= 4 and abs(max(lrs) - 0.01) < 1e-9  # 4 warm-up steps to the configured rate
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:])) and lrs[-1] < 0.03 * max(lrs)  # then ~0 at the end


# ----------------------------------------------------------------------------------------- end to end
def test_bc_zero2_with_ranking_term_learns_and_saves_hf_model(ray_local, tmp_path, tiny_model):
    from r2v.train.bc import run_train_bc

    cfg = make_cfg(tmp_path, tiny_model, 2, epochs=10.0, save_steps=1000, rank_weight=1.0, rank_negatives=3)
    before = rank_actions(tiny_model, cfg)
    summary = run_train_bc(cfg)
    epochs = summary["epochs"]
    print("bc zero2 wall", summary["train_wall_s"], "losses", [round(e["loss"], 3) for e in epochs],
          "val", [round(e["val_loss"], 3) for e in epochs])
    assert len(epochs) == 10 and summary["steps"] == 10 * 6
    assert epochs[-1]["loss"] < 0.5 * epochs[0]["loss"]
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"]
    assert all(e["tokens_per_s"] > 0 for e in epochs)
    assert epochs[-1]["rank_loss"] < epochs[0]["rank_loss"]  # the ranking term is trained...
    assert summary["final_val_rank_acc"] == 1.0  # ...and every held-out room ranks its action first
    assert summary["resumed_from_step"] is None
    out = cfg.experiment_dir / "models" / "bc"
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    after = rank_actions(out, cfg)
    assert all(after), (before, after)  # the taught action is ranked first for every prompt


def kill_rank1_once(monkeypatch, marker) -> None:
    """Rank 1 of the BC run exits the process at its first step after a checkpoint, once (see fault_injection)."""
    import r2v.train.bc
    from fault_injection import dies_once_after_checkpoint, fit_with_objective

    monkeypatch.setattr(r2v.train.bc, "fit",
                        fit_with_objective(r2v.train.bc.fit, lambda cls: dies_once_after_checkpoint(cls, marker)))


@pytest.mark.slow
def test_bc_zero3_resumes_after_worker_kill(ray_local, tmp_path, tiny_model, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from r2v.train.bc import run_train_bc

    marker = tmp_path / "killed-once"
    kill_rank1_once(monkeypatch, marker)
    cfg = make_cfg(tmp_path, tiny_model, 3, epochs=4.0, save_steps=4)
    summary = run_train_bc(cfg)
    assert marker.exists()  # rank 1 did die once ...
    assert summary["resumed_from_step"] == 4  # ... and the new worker group restored the step-4 checkpoint
    assert summary["steps"] == 24 and [e["epoch"] for e in summary["epochs"]] == [1, 2, 3, 4]
    assert summary["epochs"][-1]["loss"] < summary["epochs"][0]["loss"]
    out = cfg.experiment_dir / "models" / "bc"
    model = AutoModelForCausalLM.from_pretrained(out)  # ZeRO-3 shards consolidated into HF weights
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[1, 5, 9, 12]])
    logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    changed = [not torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values())]
    assert sum(changed) > len(changed) // 2  # trained weights, not the init ones
    assert not math.isnan(summary["final_loss"])


@pytest.mark.slow
def test_bc_lora_resumes_after_driver_crash(ray_local, tmp_path, tiny_model, monkeypatch):
    """No Ray-level retries (max_failures=0): the run fails after its first checkpoint; calling the stage
    again finds that checkpoint and resumes from it. LoRA is merged into a plain HF directory."""
    import torch
    from transformers import AutoModelForCausalLM

    from r2v.train.bc import run_train_bc

    marker = tmp_path / "killed-once"
    kill_rank1_once(monkeypatch, marker)
    cfg = make_cfg(tmp_path, tiny_model, 2, epochs=3.0, save_steps=4, max_failures=0)
    cfg.model.lora.enabled = True
    cfg.model.lora.r = 8
    with pytest.raises(Exception):
        run_train_bc(cfg)
    assert marker.exists() and not (cfg.experiment_dir / "models" / "bc").exists()
    summary = run_train_bc(cfg)
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 18
    assert summary["epochs"][-1]["loss"] < summary["epochs"][0]["loss"]
    out = cfg.experiment_dir / "models" / "bc"
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    sd, base_sd = model.state_dict(), base.state_dict()
    assert sd.keys() == base_sd.keys()  # merged: no lora_A/lora_B left
    for name in sd:
        lora_target = any(t in name for t in cfg.model.lora.target_modules)
        assert torch.equal(sd[name], base_sd[name]) != lora_target, name  # only the adapted projections moved
    again = run_train_bc(cfg)  # the finished run is reused, not retrained
    assert again["reused_checkpoint"] and again["steps"] == 18


# ----------------------------------------------------------------------------------------- TRL's SFTTrainer
def test_bc_on_trl_sft_trainer_learns_and_saves_hf_model(ray_local, tmp_path, tiny_model):
    """`bc.trainer=trl`: TRL's SFTTrainer under Ray Train + DeepSpeed ZeRO-2 on 2 workers, fed a datasets.Dataset
    over the shards' Arrow table, trains only the action tokens and reports the same per-epoch numbers."""
    from r2v.train.bc import run_train_bc

    cfg = make_cfg(tmp_path, tiny_model, 2, epochs=10.0, save_steps=1000, trainer="trl")
    summary = run_train_bc(cfg)
    epochs = summary["epochs"]
    print("bc trl wall", summary["train_wall_s"], "losses", [round(e["loss"], 3) for e in epochs],
          "val", [round(e["val_loss"], 3) for e in epochs])
    assert summary["trainer"] == "trl" and len(epochs) == 10 and summary["steps"] == 10 * 6
    assert epochs[-1]["loss"] < 0.5 * epochs[0]["loss"] and epochs[-1]["val_loss"] < epochs[0]["val_loss"]
    assert all(e["tokens_per_s"] > 0 for e in epochs)
    assert epochs[0]["val_rank_acc"] < 0.5 and summary["final_val_rank_acc"] >= 5 / 6  # plain SFT, no ranking term
    assert sum(rank_actions(cfg.experiment_dir / "models" / "bc", cfg)) >= 5


def test_bc_keeps_the_epoch_with_the_best_held_out_rank_accuracy(ray_local, tmp_path, tiny_model):
    """`bc.keep_epoch=val_rank_acc`: the saved model is the first epoch that ranked the most held-out steps right,
    not the last one (which goes on lowering the loss): its held-out loss is that epoch's, not the last's."""
    from r2v.train.bc import run_train_bc

    cfg = make_cfg(tmp_path, tiny_model, 2, epochs=16.0, save_steps=1000, trainer="trl", keep_epoch="val_rank_acc")
    summary = run_train_bc(cfg)
    epochs = summary["epochs"]
    accs = [e["val_rank_acc"] for e in epochs]
    best = accs.index(max(accs)) + 1
    print("bc keep_epoch: val_rank_acc", accs, "val_loss", [round(e["val_loss"], 4) for e in epochs])
    assert summary["best_epoch"] == best and summary["best_val_rank_acc"] == max(accs) >= 5 / 6
    assert best < len(epochs), "the toy run should reach its best accuracy before its last epoch"
    saved = held_out_loss(cfg.experiment_dir / "models" / "bc", cfg)
    assert saved == pytest.approx(epochs[best - 1]["val_loss"], abs=1e-4)
    assert abs(saved - epochs[-1]["val_loss"]) > 1e-3  # not the last epoch's weights


@pytest.mark.slow
def test_bc_on_trl_zero3_resumes_after_worker_kill(ray_local, tmp_path, tiny_model, monkeypatch):
    """Rank 1 dies after the step-4 checkpoint; Ray restarts the group, the SFTTrainer resumes from the Ray
    checkpoint (weights, optimiser, DeepSpeed ZeRO-3 shards, trainer state) and finishes the same 24 steps."""
    from transformers import AutoModelForCausalLM

    from r2v.train.bc import run_train_bc

    marker = tmp_path / "killed-once"
    kill_rank1_once(monkeypatch, marker)
    cfg = make_cfg(tmp_path, tiny_model, 3, epochs=4.0, save_steps=4, trainer="trl")
    summary = run_train_bc(cfg)
    assert marker.exists() and summary["resumed_from_step"] == 4
    assert summary["steps"] == 24 and [e["epoch"] for e in summary["epochs"]] == [1, 2, 3, 4]
    assert summary["epochs"][-1]["loss"] < summary["epochs"][0]["loss"]
    model = AutoModelForCausalLM.from_pretrained(cfg.experiment_dir / "models" / "bc")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    changed = [not a.equal(b) for a, b in zip(model.state_dict().values(), base.state_dict().values())]
    assert sum(changed) > len(changed) // 2  # ZeRO-3 shards consolidated into trained HF weights
