"""`train-dpo`: the paper's objective, L = L_DPO + λ_BC·NLL(chosen) + λ_cons·JSD, on build-pairs' pairs.

Two trainers (`dpo.trainer`), one objective: `r2v` — this loss in the Ray Train + DeepSpeed loop BC's own loop uses
(r2v.train.common), resumable mid-epoch after a driver crash too; `trl` — a `DPOTrainer` subclass running the same
loss inside the same `TorchTrainer` (r2v.train.trl_dpo), resumable after a worker failure. Both precompute the
reference log-probs the same way, score the same validation numbers and keep the best validation epoch.
The loss is TRL's `sigmoid` DPO loss:

    L_DPO = -log σ(β [(log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))])

with log-probs summed over the completion tokens (action + eos). The reference is the frozen BC model
(`models/bc`): every worker loads it once, wraps it with `eval_ds_config` (ZeRO-3 partitioned when training
uses ZeRO-3), computes the reference log-probs of *its* partition of the pairs under `torch.no_grad`, and
frees it before the policy is built. So the reference log-probs are constants of the run (a test checks
they match a fresh computation from `models/bc` after training) and the reference never meets the
optimizer.

Consistency: for a pair with a `peer_prompt` x^(z') (the same state: same task and executed actions, under
another perturbation seed; r2v.rollout.pairs),

    L_cons = JSD( softmax(f(x^(z), y_c)/T) ‖ softmax(f(x^(z'), y_c)/T) )

per position over the last N = `dpo.consistency_positions` action tokens of the chosen completion (eos
excluded), averaged over those positions, then over the pairs that have a peer (pairs without one get no
term). Gradients flow through both sides.

BC: L_BC = the chosen completion's mean per-token NLL (chosen = the teacher's action with `dpo.chosen=teacher`),
which keeps the policy on the teacher's actions while the preference term pushes its hard negatives down.

Total: L = w_DPO · mean L_DPO + λ_BC · mean L_BC + λ_cons · mean L_cons (`dpo.dpo_weight`, `dpo.bc_weight`,
`dpo.consistency_weight`; 0 switches a term off and skips its work). Pairs from val games are scored every
epoch (`val_accuracy`: share of pairs whose chosen reward beats the rejected one; `val_margin`, `val_bc_nll`,
`val_objective`), and the model saved is the epoch with the lowest `val_objective` (`best_metric`).
The policy is initialised from `models/bc`; output `<experiment>/models/dpo` (HF dir; LoRA merged).
Pairs hold actions in `chosen`/`rejected`; the target text is `completion(action)` + eos, as in BC.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from r2v.config import R2VConfig
from r2v.errors import R2VError
from r2v.train.common import encode, pad_batch, token_logps


# ----------------------------------------------------------------------------------------- the math
def select_last(mask, n: int):
    """The last `n` True positions of every row of a boolean mask."""
    from_end = mask.flip(-1).long().cumsum(-1).flip(-1)
    return mask & (from_end <= n)


def jsd(logits_p, logits_q, temperature: float = 1.0):
    """Jensen–Shannon divergence (nats) between softmax(logits/T) rows; exactly 0 for identical inputs."""
    import torch

    p = torch.softmax(logits_p.float() / temperature, dim=-1)
    q = torch.softmax(logits_q.float() / temperature, dim=-1)
    m = 0.5 * (p + q)
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def consistency_per_row(logits_a, mask_a, logits_b, mask_b, positions: int, temperature: float):
    """Mean JSD over the last `positions` action positions of each row pair. `logits_*` are [B, T, V] and
    `mask_*` the [B, T-1] action masks of the *targets* (pad_batch's `action_mask`)."""
    import torch

    sel_a, sel_b = select_last(mask_a, positions), select_last(mask_b, positions)
    if not torch.equal(sel_a.sum(-1), sel_b.sum(-1)):
        raise ValueError("consistency: the two contexts must end with the same completion tokens")
    la = logits_a[:, :-1][sel_a]
    lb = logits_b[:, :-1][sel_b]
    per_pos = jsd(la, lb, temperature)
    rows = sel_a.nonzero()[:, 0]
    counts = sel_a.sum(-1).clamp_min(1).to(per_pos.dtype)
    return torch.zeros(mask_a.shape[0], dtype=per_pos.dtype, device=per_pos.device).index_add(0, rows, per_pos) / counts


def dpo_sigmoid_loss(pi_c, pi_r, ref_c, ref_r, beta: float):
    """(per-pair loss, chosen reward, rejected reward)."""
    import torch.nn.functional as F

    chosen_reward = beta * (pi_c - ref_c)
    rejected_reward = beta * (pi_r - ref_r)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward, rejected_reward


def policy_forward(model, features: list[dict[str, Any]], pad_id: int, device, positions: int,
                   temperature: float, consistency: bool = True) -> dict[str, Any]:
    """One forward over [chosen; rejected; chosen-under-peer-prompt] rows. Returns summed completion
    log-probs of chosen and rejected, the per-pair JSD for pairs with a peer, and the peer row indices."""
    b = len(features)
    peers = [i for i, f in enumerate(features) if consistency and f.get("peer") is not None]
    seqs = [f["chosen"] for f in features] + [f["rejected"] for f in features] + [features[i]["peer"] for i in peers]
    batch = pad_batch(seqs, pad_id, device)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    seq_logps = (token_logps(logits, batch["input_ids"]) * batch["loss_mask"]).sum(-1)
    n_completion = batch["loss_mask"][:b].sum(-1).clamp_min(1).to(seq_logps.dtype)
    out = {"chosen": seq_logps[:b], "rejected": seq_logps[b : 2 * b], "peer_rows": peers,
           "chosen_nll": -seq_logps[:b] / n_completion, "tokens": batch["attention_mask"].sum(), "cons": None}
    if peers:
        import torch

        idx = torch.tensor(peers, device=logits.device)
        out["cons"] = consistency_per_row(logits[idx], batch["action_mask"][idx], logits[2 * b :],
                                          batch["action_mask"][2 * b :], positions, temperature)
    return out


def reference_logps(ref_model, features: list[dict[str, Any]], pad_id: int, device,
                    batch_size: int) -> list[tuple[float, float]]:
    """(chosen, rejected) summed completion log-probs under the frozen reference, no grad."""
    import torch

    out: list[tuple[float, float]] = []
    with torch.no_grad():
        for i in range(0, len(features), batch_size):
            chunk = features[i : i + batch_size]
            res = policy_forward(ref_model, chunk, pad_id, device, 1, 1.0, consistency=False)
            out.extend(zip(res["chosen"].double().tolist(), res["rejected"].double().tolist()))
    return out


def dpo_loss(model, features: list[dict[str, Any]], pad_id: int, device, *, beta: float, weight: float,
             positions: int, temperature: float, bc_weight: float = 0.0, dpo_weight: float = 1.0):
    """(loss tensor, stat sums) for a batch of encoded pairs carrying `ref_chosen`/`ref_rejected`:
    dpo_weight·L_DPO + bc_weight·NLL(chosen) + weight·JSD; the DPO stats are reported whatever the weights."""
    import torch

    res = policy_forward(model, features, pad_id, device, positions, temperature, consistency=weight > 0)
    ref_c = torch.tensor([f["ref_chosen"] for f in features], device=res["chosen"].device, dtype=res["chosen"].dtype)
    ref_r = torch.tensor([f["ref_rejected"] for f in features], device=ref_c.device, dtype=ref_c.dtype)
    losses, rc, rr = dpo_sigmoid_loss(res["chosen"], res["rejected"], ref_c, ref_r, beta)
    loss = dpo_weight * losses.mean()
    if bc_weight > 0:
        loss = loss + bc_weight * res["chosen_nll"].mean()
    cons_sum, cons_rows = 0.0, 0
    if res["cons"] is not None:
        loss = loss + weight * res["cons"].mean()
        cons_sum, cons_rows = float(res["cons"].detach().sum()), len(res["peer_rows"])
    margin = (rc - rr).detach()
    stats = {
        "pairs": float(len(features)), "dpo_loss_sum": float(losses.detach().sum()), "margin_sum": float(margin.sum()),
        "acc_sum": float((margin > 0).float().sum()), "chosen_reward_sum": float(rc.detach().sum()),
        "rejected_reward_sum": float(rr.detach().sum()), "cons_sum": cons_sum, "cons_rows": float(cons_rows),
        "bc_nll_sum": float(res["chosen_nll"].detach().sum()), "objective_sum": float(loss.detach()) * len(features),
        "tokens": float(res["tokens"]),
    }
    return loss, stats


# ----------------------------------------------------------------------------------------- in the loop
def encode_example(tokenizer, ex: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """A pair's token sequences: prompt + chosen, prompt + rejected, and peer prompt + chosen (None without a peer)."""
    peer = ex.get("peer_prompt")
    return {
        "chosen": encode(tokenizer, ex["prompt"], ex["chosen"], max_tokens),
        "rejected": encode(tokenizer, ex["prompt"], ex["rejected"], max_tokens),
        "peer": encode(tokenizer, peer, ex["chosen"], max_tokens) if peer else None,
    }


class DPOObjective:
    name = "dpo"
    best_metric = ("val_objective", "min")  # the saved model is the epoch with the lowest total loss on val pairs

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.max_tokens = int(config["max_tokens"])
        self.beta = float(config["beta"])
        self.weight = float(config["consistency_weight"])
        self.bc_weight = float(config.get("bc_weight", 0.0))
        self.dpo_weight = float(config.get("dpo_weight", 1.0))
        self.positions = int(config["consistency_positions"])
        self.temperature = float(config["consistency_temperature"])
        self.extra_metrics: dict[str, Any] = {}

    def encode(self, tokenizer, ex: dict[str, Any]) -> dict[str, Any]:
        return encode_example(tokenizer, ex, self.max_tokens)

    def prepare(self, ctx) -> None:
        """Reference log-probs of this rank's pairs from the frozen reference (ZeRO-3 partitioned if the
        run uses ZeRO-3). Every rank runs the same number of batches: partitions are equal-sized."""
        import gc

        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM

        from r2v.train.common import _all_reduce_sums
        from r2v.train.deepspeed_config import eval_ds_config

        train = self.config["train"]
        mbs = int(train["per_device_batch_size"])
        ref = AutoModelForCausalLM.from_pretrained(self.config["ref_path"], dtype=torch.float32)
        ref.requires_grad_(False)
        ds = eval_ds_config(zero_stage=int(train["zero_stage"]), micro_batch_size=mbs, world_size=ctx.world,
                            bf16=bool(self.config["bf16"]))
        engine, *_ = deepspeed.initialize(model=ref, config=ds)
        engine.eval()
        for feats in (ctx.train_features, ctx.val_features):
            for f, (c, r) in zip(feats, reference_logps(engine, feats, ctx.pad_id, ctx.device, mbs)):
                f["ref_chosen"], f["ref_rejected"] = c, r
        sums = {"ref_chosen_logp_sum": sum(f["ref_chosen"] * w for f, w in zip(ctx.train_features, ctx.train_weights)),
                "ref_rejected_logp_sum": sum(f["ref_rejected"] * w for f, w in zip(ctx.train_features, ctx.train_weights))}
        self.extra_metrics = _all_reduce_sums(sums, sorted(sums), ctx.device)
        del engine, ref
        gc.collect()

    def loss(self, model, features, ctx):
        return dpo_loss(model, features, ctx.pad_id, ctx.device, beta=self.beta, weight=self.weight,
                        positions=self.positions, temperature=self.temperature, bc_weight=self.bc_weight,
                        dpo_weight=self.dpo_weight)

    def eval_stats(self, model, features, weights, ctx) -> dict[str, float]:
        import torch

        mbs = int(self.config["train"]["per_device_batch_size"])
        out: dict[str, float] = {}
        with torch.no_grad():
            for i in range(0, len(features), mbs):
                # wrapped duplicates count twice here (dropping them would unbalance ZeRO-3's collectives)
                _, stats = self.loss(model, features[i : i + mbs], ctx)
                for k, v in stats.items():
                    out[k] = out.get(k, 0.0) + v
        return out

    @staticmethod
    def summarize(sums: dict[str, float]) -> dict[str, float]:
        n = max(1.0, sums.get("pairs", 0.0))
        out = {
            "loss": sums.get("dpo_loss_sum", 0.0) / n,
            "margin": sums.get("margin_sum", 0.0) / n,
            "accuracy": sums.get("acc_sum", 0.0) / n,
            "chosen_reward": sums.get("chosen_reward_sum", 0.0) / n,
            "rejected_reward": sums.get("rejected_reward_sum", 0.0) / n,
            "consistency": sums.get("cons_sum", 0.0) / max(1.0, sums.get("cons_rows", 0.0)),
            "bc_nll": sums.get("bc_nll_sum", 0.0) / n,
            "objective": sums.get("objective_sum", 0.0) / n,  # the weighted total that is minimised
        }
        if "tokens" in sums:
            out["tokens"] = sums["tokens"]
        return out


# ----------------------------------------------------------------------------------------- the stage
def dpo_examples(cfg: R2VConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Path]]:
    """(train pairs, validation pairs from val games, the pair files)."""
    from r2v.data import ShardStore
    from r2v.experiment import Experiment
    from r2v.policies.prompts import completion

    store = ShardStore(Experiment(cfg).pairs, "pairs")
    files = store.files()
    if not files:
        raise R2VError(f"no preference pairs under {store.root}: run `r2v build-pairs` first")
    train, val = [], []
    for row in store.read(["prompt", "chosen", "rejected", "peer_prompt", "split"]).to_pylist():
        chosen, rejected = (row["chosen"] or "").strip(), (row["rejected"] or "").strip()
        if not chosen or not rejected or chosen == rejected:
            continue
        (val if row["split"] == "val" else train).append(
            {"prompt": row["prompt"], "chosen": completion(chosen), "rejected": completion(rejected),
             "peer_prompt": row["peer_prompt"] or None})
    if not train:
        raise R2VError(f"the pairs under {store.root} hold no usable (chosen != rejected) training pair")
    return train, val, files


def run_train_dpo(cfg: R2VConfig) -> dict[str, Any]:
    """Pipeline stage `train-dpo`: `models/bc` (policy init and frozen reference) -> `models/dpo`."""
    from r2v.experiment import Experiment

    return train_dpo(cfg, Experiment(cfg).model("dpo"))


def train_dpo(cfg: R2VConfig, out_dir: Path) -> dict[str, Any]:
    """DPO from the experiment's `models/bc` on its pairs, under `cfg.dpo`, into `out_dir` (the stage's
    models/dpo, or an ablation's directory: `bench.slm_quality --ablate`)."""
    from r2v.experiment import Experiment
    from r2v.train.common import fit

    pairs, val_pairs, files = dpo_examples(cfg)
    exp = Experiment(cfg)
    bc_dir = exp.model("bc")
    if not (bc_dir / "config.json").is_file():
        raise R2VError(f"{bc_dir} is not a Hugging Face model directory: run `r2v train-bc` first")
    d = cfg.dpo
    worker, train = None, pairs
    if d.trainer == "trl":  # the pairs as one Arrow table: each rank wraps it in a datasets.Dataset
        import pyarrow as pa

        from r2v.train.trl_dpo import dpo_worker

        worker, train = dpo_worker, pa.Table.from_pylist(pairs)
    extra = {"trainer": d.trainer, "beta": d.beta, "consistency_weight": d.consistency_weight, "consistency_positions": d.consistency_positions,
             "consistency_temperature": d.consistency_temperature, "bc_weight": d.bc_weight,
             "dpo_weight": d.dpo_weight, "ref_path": str(bc_dir.resolve())}
    summary = fit(cfg, kind="dpo", objective_cls=DPOObjective, train=d.train, model_path=str(bc_dir),
                  out_dir=out_dir, train_examples=train, val_examples=val_pairs,
                  extra=extra, data_files=files, worker=worker)
    summary["pairs_with_peer"] = sum(1 for p in pairs if p["peer_prompt"])
    if summary.get("final_margin") is not None and not math.isfinite(summary["final_margin"]):
        raise R2VError("DPO diverged (non-finite reward margin); lower dpo.train.learning_rate")
    return summary


__all__ = ["run_train_dpo", "train_dpo", "dpo_examples", "DPOObjective", "dpo_loss", "jsd", "consistency_per_row",
           "reference_logps", "policy_forward", "dpo_sigmoid_loss", "select_last"]
