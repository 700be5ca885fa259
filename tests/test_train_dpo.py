"""DPO + consistency (JSD): the math in-process, then end to end on Ray Train + DeepSpeed (2 CPU workers)."""
from __future__ import annotations

import hashlib
import shutil

import pytest

from r2v.config import R2VConfig, TinyModelConfig
from r2v.data import ShardStore, shard_key

ACTIONS = ["go north", "go south", "take key", "open door", "eat apple", "look"]
ROOMS = ["kitchen", "cellar", "garden", "attic", "hall", "study"]


def prompt(room: str, noise: str = "") -> str:
    from r2v.policies.prompts import format_prompt

    return format_prompt(f"find the treasure in the {room}", [], f"You are in the {room}.{noise} Exits lead everywhere.")


def pair_rows(copies: int = 4) -> list[dict]:
    rows = []
    for c in range(copies):
        for i, room in enumerate(ROOMS):
            rows.append({
                "experiment": "dpo", "env": "toy", "task_id": f"t{i}", "episode_id": f"e{i}-{c}", "step": 0,
                "perturbation_seed": 1, "prompt": prompt(room), "chosen": ACTIONS[i],
                "rejected": ACTIONS[(i + 1) % len(ACTIONS)], "chosen_score": 1.0, "rejected_score": 0.0,
                # every other room has a peer under another seed (a distractor line); the rest get no term
                "peer_prompt": prompt(room, " A note says: go west.") if i % 2 == 0 else None,
                "peer_seed": 2 if i % 2 == 0 else None,
            })
    return rows


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from r2v.policies.init_model import save_tiny_model
    from r2v.policies.prompts import completion

    texts = [prompt(r, n) + completion(a) for r in ROOMS for a in ACTIONS for n in ("", " A note says: go west.")]
    out = tmp_path_factory.mktemp("tiny") / "init"
    arch = TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, vocab_size=400)
    save_tiny_model(texts * 4, arch, out, max_positions=128)
    return out


def encoded(tok, rows, max_tokens=96):
    from r2v.policies.prompts import completion
    from r2v.train.dpo import DPOObjective

    obj = DPOObjective({"max_tokens": max_tokens, "beta": 0.1, "consistency_weight": 0.1,
                        "consistency_positions": 5, "consistency_temperature": 2.0})
    return [obj.encode(tok, {"prompt": r["prompt"], "chosen": completion(r["chosen"]),
                             "rejected": completion(r["rejected"]), "peer_prompt": r["peer_prompt"]}) for r in rows]


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------------------- unit level
def test_jsd_zero_for_identical_contexts_positive_for_different(tiny_model):
    import torch

    from r2v.train.dpo import jsd, policy_forward, select_last

    x = torch.randn(7, 50)
    assert torch.equal(jsd(x, x.clone(), 2.0), torch.zeros(7))
    assert (jsd(x, torch.randn(7, 50), 2.0) > 0).all()
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert select_last(mask, 2).tolist() == [[False, False, True, True, False], [True, True, False, False, False]]

    model, tok = load(tiny_model)
    same = [dict(r, peer_prompt=r["prompt"]) for r in pair_rows(1)]
    res = policy_forward(model, encoded(tok, same), tok.pad_token_id, "cpu", 5, 2.0)
    assert len(res["peer_rows"]) == len(same)
    assert float(res["cons"].detach().abs().max()) < 1e-7  # identical contexts: zero (up to batched-matmul rounding)
    res = policy_forward(model, encoded(tok, pair_rows(1)), tok.pad_token_id, "cpu", 5, 2.0)
    assert res["peer_rows"] == [0, 2, 4]  # rows without a peer get no term
    assert (res["cons"] > 1e-6).all()


def test_consistency_term_decreases_under_training(tiny_model):
    import torch

    from r2v.train.dpo import policy_forward

    torch.manual_seed(0)
    model, tok = load(tiny_model)
    feats = encoded(tok, [r for r in pair_rows(1) if r["peer_prompt"]])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    values = []
    for _ in range(12):
        cons = policy_forward(model, feats, tok.pad_token_id, "cpu", 5, 2.0)["cons"].mean()
        values.append(float(cons))
        opt.zero_grad()
        cons.backward()
        opt.step()
    assert values[-1] < 0.5 * values[0], values


def test_reference_logps_constant_and_dpo_loss_and_margin_improve(tiny_model):
    import torch

    from r2v.train.dpo import dpo_loss, policy_forward, reference_logps

    torch.manual_seed(0)
    ref, tok = load(tiny_model)
    ref.requires_grad_(False).eval()
    policy, _ = load(tiny_model)
    feats = encoded(tok, pair_rows(1))
    before = reference_logps(ref, feats, tok.pad_token_id, "cpu", 4)
    for f, (c, r) in zip(feats, before):
        f["ref_chosen"], f["ref_rejected"] = c, r
    pol0 = policy_forward(policy, feats, tok.pad_token_id, "cpu", 5, 2.0)["chosen"].detach().clone()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    losses, margins = [], []
    for _ in range(15):
        loss, stats = dpo_loss(policy, feats, tok.pad_token_id, "cpu", beta=0.1, weight=0.1, positions=5,
                               temperature=2.0)
        losses.append(stats["dpo_loss_sum"] / stats["pairs"])
        margins.append(stats["margin_sum"] / stats["pairs"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(losses[0] - 0.6931) < 1e-3 and abs(margins[0]) < 1e-4  # policy == reference at step 0
    assert losses[-1] < losses[0] - 0.05, losses
    assert margins[-1] > margins[0] + 0.1, margins
    assert reference_logps(ref, feats, tok.pad_token_id, "cpu", 4) == before  # reference untouched by training
    pol1 = policy_forward(policy, feats, tok.pad_token_id, "cpu", 5, 2.0)["chosen"].detach()
    assert not torch.allclose(pol0, pol1)


# ----------------------------------------------------------------------------------------- end to end
def make_cfg(tmp_path, tiny_model, zero_stage: int) -> R2VConfig:
    cfg = R2VConfig(experiment="dpo", runs_dir=str(tmp_path))
    cfg.tracking.enabled = False
    cfg.model.max_context_tokens = 96
    t = cfg.dpo.train
    t.num_workers, t.zero_stage, t.per_device_batch_size, t.learning_rate = 2, zero_stage, 4, 5e-3
    t.epochs, t.save_steps = 6.0, 1000
    cfg.dpo.beta = 0.5
    cfg.dpo.bc_weight = 0.1  # the stand-in "BC" model is untrained (NLL ~6): a full-weight BC term would swamp DPO
    shutil.copytree(tiny_model, cfg.experiment_dir / "models" / "bc")  # stands in for a BC model
    store = ShardStore(cfg.experiment_dir / "pairs", "pairs")
    rows = pair_rows(4)
    store.write(shard_key(part=0), rows[:12])
    store.write(shard_key(part=1), rows[12:])
    store.write(shard_key(part="val"), [dict(r, split="val") for r in pair_rows(1)])  # validation pairs
    return cfg


def dir_hash(path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def check_dpo_run(cfg, summary):
    import torch

    from r2v.train.dpo import reference_logps

    ep = summary["epochs"]
    print("dpo", cfg.dpo.train.zero_stage, "wall", round(summary["train_wall_s"], 1),
          [(round(e["loss"], 3), round(e["margin"], 3), round(e["consistency"], 4)) for e in ep])
    assert len(ep) == 6 and summary["pairs_with_peer"] == 12
    assert ep[-1]["loss"] < ep[0]["loss"] and ep[-1]["margin"] > ep[0]["margin"] > -0.05
    assert ep[-1]["accuracy"] > 0.8 and ep[-1]["consistency"] > 0
    assert summary["num_train_examples"] == 24 and summary["num_val_examples"] == 6  # val pairs never trained on
    assert ep[0]["val_margin"] < ep[-1]["val_margin"] and ep[-1]["val_accuracy"] > 0.8  # scored every epoch
    # the reference log-probs used in training equal a fresh computation from the untouched models/bc
    ref, tok = load(cfg.experiment_dir / "models" / "bc")
    feats = encoded(tok, pair_rows(4))
    want = sum(c for c, _ in reference_logps(ref.eval(), feats, tok.pad_token_id, "cpu", 8))
    assert abs(summary["ref_chosen_logp_sum"] - want) < 1e-3 * abs(want)
    model, _ = load(cfg.experiment_dir / "models" / "dpo")
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 4, 7, 9]])).logits).all()
    # the saved model is the best validation epoch's: its objective on the val pairs is the best one logged
    best = min(range(len(ep)), key=lambda i: ep[i]["val_objective"])
    assert summary["best_epoch"] == best + 1 and summary["best_val_objective"] == ep[best]["val_objective"]
    assert saved_val_objective(cfg) == pytest.approx(ep[best]["val_objective"], rel=1e-3)


def saved_val_objective(cfg) -> float:
    """The objective of the saved models/dpo on the val pairs, recomputed in-process."""
    import torch

    from r2v.train.dpo import dpo_loss, reference_logps

    ref, tok = load(cfg.experiment_dir / "models" / "bc")
    model, _ = load(cfg.experiment_dir / "models" / "dpo")
    val = encoded(tok, pair_rows(1))
    for f, (c, r) in zip(val, reference_logps(ref.eval(), val, tok.pad_token_id, "cpu", 8)):
        f["ref_chosen"], f["ref_rejected"] = c, r
    d = cfg.dpo
    with torch.no_grad():
        got, _ = dpo_loss(model.eval(), val, tok.pad_token_id, "cpu", beta=d.beta, weight=d.consistency_weight,
                          positions=d.consistency_positions, temperature=d.consistency_temperature,
                          bc_weight=d.bc_weight, dpo_weight=d.dpo_weight)
    return float(got)


def test_each_term_of_the_objective_switches_off_on_its_own(tiny_model):
    """L = w_DPO·L_DPO + λ_BC·NLL(chosen) + λ_cons·JSD: each weight scales exactly its term, 0 removes it (and
    the consistency forward on peer prompts is skipped)."""
    import torch

    from r2v.train.dpo import dpo_loss, policy_forward

    model, tok = load(tiny_model)
    feats = encoded(tok, pair_rows(1))
    for f in feats:  # a reference unlike the policy, so the DPO term is not at its log 2 starting value
        f["ref_chosen"], f["ref_rejected"] = -30.0, -20.0
    res = policy_forward(model, feats, tok.pad_token_id, "cpu", 5, 0.2)
    n_tokens = [len(f["chosen"]["input_ids"]) - f["chosen"]["n_prompt"] for f in feats]
    nll = -res["chosen"] / torch.tensor(n_tokens, dtype=res["chosen"].dtype)  # mean per-token NLL of the chosen
    assert torch.allclose(res["chosen_nll"], nll)
    margin = 0.1 * ((res["chosen"] + 30.0) - (res["rejected"] + 20.0))
    dpo, bc, cons = float(torch.nn.functional.softplus(-margin).mean()), float(nll.mean()), float(res["cons"].mean())
    assert min(dpo, bc, cons) > 1e-4

    def total(**w):
        loss, stats = dpo_loss(model, feats, tok.pad_token_id, "cpu", beta=0.1, positions=5, temperature=0.2, **w)
        return float(loss), stats

    assert total(weight=0.0, bc_weight=0.0)[0] == pytest.approx(dpo, rel=1e-5)
    assert total(weight=0.0, bc_weight=1.0, dpo_weight=0.0)[0] == pytest.approx(bc, rel=1e-5)
    assert total(weight=1.0, bc_weight=0.0, dpo_weight=0.0)[0] == pytest.approx(cons, rel=1e-4)
    full, stats = total(weight=30.0, bc_weight=0.5, dpo_weight=2.0)
    assert full == pytest.approx(2.0 * dpo + 0.5 * bc + 30.0 * cons, rel=1e-4)
    assert stats["cons_rows"] == 3 and stats["bc_nll_sum"] == pytest.approx(float(nll.sum()), rel=1e-5)
    _, off = total(weight=0.0, bc_weight=0.0)
    assert off["cons_rows"] == 0 and off["dpo_loss_sum"] == pytest.approx(stats["dpo_loss_sum"], rel=1e-5)


def test_bc_term_raises_the_chosen_actions_likelihood(tiny_model):
    """With the DPO term off, the BC term alone is plain NLL on the chosen (teacher) action: it goes down."""
    import torch

    from r2v.train.dpo import dpo_loss

    torch.manual_seed(0)
    model, tok = load(tiny_model)
    feats = encoded(tok, pair_rows(1))
    for f in feats:
        f["ref_chosen"], f["ref_rejected"] = 0.0, 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    nll = []
    for _ in range(10):
        loss, stats = dpo_loss(model, feats, tok.pad_token_id, "cpu", beta=0.1, weight=0.0, positions=5,
                               temperature=2.0, bc_weight=1.0, dpo_weight=0.0)
        nll.append(stats["bc_nll_sum"] / stats["pairs"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert nll[-1] < 0.7 * nll[0], nll


@pytest.mark.ray
def test_dpo_zero2_end_to_end(ray_local, tmp_path, tiny_model):
    from r2v.train.dpo import run_train_dpo

    cfg = make_cfg(tmp_path, tiny_model, 2)
    bc_before = dir_hash(cfg.experiment_dir / "models" / "bc")
    summary = run_train_dpo(cfg)
    check_dpo_run(cfg, summary)
    assert dir_hash(cfg.experiment_dir / "models" / "bc") == bc_before  # the reference model is never written


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["r2v", "trl"])
def test_dpo_zero3_end_to_end(ray_local, tmp_path, tiny_model, trainer):
    from r2v.train.dpo import run_train_dpo

    cfg = make_cfg(tmp_path, tiny_model, 3)
    cfg.dpo.trainer = trainer
    check_dpo_run(cfg, run_train_dpo(cfg))


@pytest.mark.ray
def test_dpo_on_trl_zero2_end_to_end(ray_local, tmp_path, tiny_model):
    """`dpo.trainer=trl`: the DPOTrainer subclass under Ray Train + DeepSpeed ZeRO-2 on 2 workers, fed a
    datasets.Dataset: the same checks as the own loop (learning, val numbers per epoch, reference log-probs,
    the best validation epoch saved)."""
    from r2v.train.dpo import run_train_dpo

    cfg = make_cfg(tmp_path, tiny_model, 2)
    cfg.dpo.trainer = "trl"
    bc_before = dir_hash(cfg.experiment_dir / "models" / "bc")
    summary = run_train_dpo(cfg)
    assert summary["trainer"] == "trl" and summary["steps"] == 6 * 3  # 24 pairs / (2 ranks x 4) per epoch
    check_dpo_run(cfg, summary)
    assert dir_hash(cfg.experiment_dir / "models" / "bc") == bc_before


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["r2v", "trl"])
def test_dpo_keeps_the_best_epochs_weights_across_a_worker_kill(ray_local, tmp_path, tiny_model, monkeypatch,
                                                                trainer):
    """Rank 1 dies once after the step-4 checkpoint (mid epoch 2). The best epoch is made epoch 1 (best =
    highest val objective: training lowers it), so the model saved at the end can only be right if epoch 1's
    weights came back from that checkpoint (`best_weights.pt`) after the restart. Both trainers."""
    import r2v.train.common
    from fault_injection import dies_once_after_checkpoint, fit_with_objective
    from r2v.train.dpo import run_train_dpo

    marker = tmp_path / "killed-once"

    def wrap(cls):
        return type("BestIsFirst", (dies_once_after_checkpoint(cls, marker),), {"best_metric": ("val_objective", "max")})

    monkeypatch.setattr(r2v.train.common, "fit", fit_with_objective(r2v.train.common.fit, wrap))  # run_train_dpo's
    cfg = make_cfg(tmp_path, tiny_model, 2)
    cfg.dpo.train.save_steps = 4
    cfg.dpo.trainer = trainer
    summary = run_train_dpo(cfg)
    ep = summary["epochs"]
    assert marker.exists() and summary["resumed_from_step"] == 4 and len(ep) == 6
    assert summary["best_epoch"] == 1 and ep[0]["val_objective"] > ep[-1]["val_objective"] + 0.05
    assert saved_val_objective(cfg) == pytest.approx(ep[0]["val_objective"], rel=1e-3)


# ----------------------------------------------------------------------------------------- dpo.trainer=trl
def trl_trainer(tmp_path, model_path, rows, **weights):
    """The `dpo.trainer=trl` trainer in-process (no Ray, no DeepSpeed) on `rows`, reference log-probs from the
    untouched model (as `pair_dataset` computes them on a worker)."""
    import datasets
    from trl import DPOConfig

    from r2v.train.common import WorkerContext
    from r2v.train.dpo import DPOObjective, reference_logps
    from r2v.train.trl_dpo import r2v_dpo_trainer

    ref, tok = load(model_path)
    feats = encoded(tok, rows)
    refs = reference_logps(ref.eval(), feats, tok.pad_token_id, "cpu", 8)
    ds = datasets.Dataset.from_list([
        {"chosen_ids": f["chosen"]["input_ids"], "chosen_n": f["chosen"]["n_prompt"],
         "rejected_ids": f["rejected"]["input_ids"], "rejected_n": f["rejected"]["n_prompt"],
         "peer_ids": f["peer"]["input_ids"] if f["peer"] else [], "peer_n": f["peer"]["n_prompt"] if f["peer"] else 0,
         "ref_chosen": c, "ref_rejected": r} for f, (c, r) in zip(feats, refs)])
    config = {"max_tokens": 96, "beta": 0.5, "consistency_weight": 0.1, "consistency_positions": 5,
              "consistency_temperature": 2.0, "bc_weight": 0.1, "dpo_weight": 1.0, **weights}
    objective = DPOObjective(config)
    ctx = WorkerContext(rank=0, world=1, device=torch_device(), tokenizer=tok, config=config)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=6, learning_rate=5e-3,
                     num_train_epochs=15, lr_scheduler_type="constant", use_cpu=True, report_to=[], logging_strategy="no", save_strategy="no",
                     disable_tqdm=True, remove_unused_columns=False, activation_checkpointing=False,
                     beta=objective.beta, precompute_ref_log_probs=True, seed=0)
    from r2v.train.trl_dpo import collate_pairs

    policy, _ = load(model_path)
    return r2v_dpo_trainer()(model=policy, args=args, train_dataset=ds, processing_class=tok,
                             data_collator=collate_pairs, objective=objective, ctx=ctx), feats, refs


def torch_device():
    import torch

    return torch.device("cpu")


def test_trl_dpo_trainer_loss_is_the_objective_and_trains(tmp_path, tiny_model):
    """The DPOTrainer subclass computes exactly `dpo_loss` on its batch (every term, every switch), and TRL's loop
    on it raises the reward accuracy and margin."""
    import torch

    from r2v.train.dpo import dpo_loss

    rows = pair_rows(1)
    for weights in ({}, {"consistency_weight": 0.0}, {"bc_weight": 0.0}, {"dpo_weight": 0.0, "bc_weight": 1.0}):
        trainer, feats, refs = trl_trainer(tmp_path, tiny_model, rows, **weights)
        assert trainer.ref_model is None and not trainer.args.gradient_checkpointing
        batch = next(iter(trainer.get_train_dataloader()))
        got = trainer.compute_loss(trainer.model, batch)
        for f, (c, r) in zip(feats, refs):
            f["ref_chosen"], f["ref_rejected"] = c, r
        o = trainer.objective
        want, _ = dpo_loss(trainer.model, feats, trainer.ctx.pad_id, "cpu", beta=o.beta, weight=o.weight,
                           positions=o.positions, temperature=o.temperature, bc_weight=o.bc_weight,
                           dpo_weight=o.dpo_weight)
        assert float(got.detach()) == pytest.approx(float(want), rel=1e-5), weights
    losses = {}
    for name, weights in (("full", {}), ("no_cons", {"consistency_weight": 0.0}), ("no_bc", {"bc_weight": 0.0})):
        trainer, _, _ = trl_trainer(tmp_path, tiny_model, rows, **weights)
        losses[name] = float(trainer.compute_loss(trainer.model, next(iter(trainer.get_train_dataloader()))))
    assert losses["full"] > losses["no_cons"] + 1e-6 and losses["full"] > losses["no_bc"] + 1e-6  # each term counts

    torch.manual_seed(0)
    trainer, _, _ = trl_trainer(tmp_path, tiny_model, rows)
    trainer.train()
    s = trainer.summarize(trainer.epoch_sums)  # the last epoch's sums (no EpochEnd callback here: never cleared)
    assert all(map(lambda v: v == v and abs(v) < float("inf"), s.values()))
    assert s["accuracy"] > 0.8 and s["margin"] > 0.1 and s["consistency"] > 0


@pytest.mark.ray
@pytest.mark.slow
def test_dpo_on_trl_with_lora_saves_a_merged_model(ray_local, tmp_path, tiny_model):
    """`dpo.trainer=trl` with `model.lora`: DPOTrainer builds the adapter (`peft_config`), the run learns, and
    models/dpo is a plain HF model (adapter merged) that differs from models/bc only in the adapted layers."""
    import torch

    from r2v.train.dpo import run_train_dpo

    cfg = make_cfg(tmp_path, tiny_model, 2)
    cfg.dpo.trainer = "trl"
    cfg.model.lora.enabled, cfg.model.lora.r = True, 8
    cfg.dpo.train.learning_rate = 2e-2
    ep = run_train_dpo(cfg)["epochs"]
    assert ep[-1]["val_margin"] > ep[0]["val_margin"] and ep[-1]["margin"] > ep[0]["margin"]
    bc, _ = load(cfg.experiment_dir / "models" / "bc")
    dpo, _ = load(cfg.experiment_dir / "models" / "dpo")
    bc_sd, dpo_sd = bc.state_dict(), dpo.state_dict()
    assert dpo_sd.keys() == bc_sd.keys()  # merged: no lora_A/lora_B left
    for name, w in dpo_sd.items():
        adapted = any(t in name for t in cfg.model.lora.target_modules)
        assert torch.equal(w, bc_sd[name]) != adapted, name
