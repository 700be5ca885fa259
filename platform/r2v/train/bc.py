"""`train-bc`: behavioural cloning (SFT) of the SLM on teacher steps, on Ray Train + DeepSpeed ZeRO.

Data: the teacher step shards (`rollouts/teacher`), rows with actor == "teacher" and a non-empty action.
Split column `train` is trained on, `val` gives the held-out loss (and, in rank mode, the held-out ranking
accuracy over the step's admissible commands) each epoch. Each row becomes
prompt = `prompt_from_row(row, policy.history_steps)`, completion = `completion(action)` + eos; the prompt
is cut from the left so the sequence fits `model.max_context_tokens`; the loss (token-mean cross-entropy)
is on the completion tokens only.

Loop (`bc.trainer`): `r2v` — a plain `deepspeed.initialize` loop inside `ray.train.torch.TorchTrainer`
(r2v.train.common), exactly resumable mid-epoch after a driver crash and shared with DPO; `trl` — TRL's
`SFTTrainer` in the same `TorchTrainer` (r2v.train.trl_sft), resumable after a worker failure. Both train on
the same token split and report the same per-epoch validation numbers.
LoRA (`model.lora.enabled`): the adapter is trained and **merged** into the base weights when the final
model is written, so `models/bc` is always a plain HF causal-LM directory.
Output: `<experiment>/models/bc` (weights + tokenizer); per-epoch train loss, val loss and tokens/s in
the returned summary (and in MLflow when a run is active).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from r2v.config import R2VConfig
from r2v.errors import R2VError
from r2v.train.common import encode, fit, pad_batch, token_logps


class SFTObjective:
    """Token-mean cross-entropy on completion tokens. Examples that carry `negatives` (the other admissible
    commands of the step) are also scored as a ranking: the share of steps whose teacher action has the
    highest summed log-prob is reported as `rank_acc` (held-out: `val_rank_acc`, the accuracy a rank-mode
    policy acts with), and with `bc.rank_weight` > 0 the listwise loss −log softmax(scores)[teacher] is added.
    SFT alone fits the action's text; the ranking term fits the choice among the commands offered, which is
    what a rank-mode policy does at every step."""

    name = "bc"

    def __init__(self, config: dict[str, Any]):
        from r2v.config import BC_KEEP_EPOCH

        self.max_tokens = int(config["max_tokens"])
        self.rank_weight = float(config["train"]["rank_weight"])
        keep = config["train"].get("keep_epoch", "last")
        if BC_KEEP_EPOCH[keep]:  # the trainers keep this epoch's weights (r2v.train.common: `best_metric`)
            self.best_metric = (keep, BC_KEEP_EPOCH[keep])

    def encode(self, tokenizer, example: dict[str, Any]) -> dict[str, Any]:
        out = encode(tokenizer, example["prompt"], example["completion"], self.max_tokens)
        out["negatives"] = [encode(tokenizer, example["prompt"], c, self.max_tokens)
                            for c in example.get("negatives") or []]
        return out

    def prepare(self, ctx) -> None:
        pass

    def _forward(self, model, features, ctx, with_negatives: bool):
        """Per-token completion log-probs of the teacher actions (rows 0..n-1), then of every example's
        negatives in order, from one padded forward pass."""
        seqs = list(features) + ([g for f in features for g in f["negatives"]] if with_negatives else [])
        batch = pad_batch(seqs, ctx.pad_id, ctx.device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_logps(logits, batch["input_ids"]) * batch["loss_mask"], batch

    @staticmethod
    def _ranking(seq_logps, features):
        """Per example with negatives: (−log softmax over [teacher, negatives] at the teacher, teacher ranked
        first). Empty tensors when no example has negatives."""
        import torch

        off, nll, first = len(features), [], []  # negatives start after the n teacher rows
        for i, f in enumerate(features):
            k = len(f["negatives"])
            if k:
                scores = torch.cat([seq_logps[i : i + 1], seq_logps[off : off + k]])
                nll.append(torch.logsumexp(scores, 0) - scores[0])
                first.append(scores[1:].max() < scores[0])
            off += k
        if not nll:
            return seq_logps.new_zeros(0), seq_logps.new_zeros(0, dtype=torch.bool)
        return torch.stack(nll), torch.stack(first)

    def loss(self, model, features, ctx):
        ranked = self.rank_weight > 0
        tok_lp, batch = self._forward(model, features, ctx, with_negatives=ranked)
        n = len(features)
        mask = batch["loss_mask"][:n]
        nll_sum = -tok_lp[:n].sum()
        loss = nll_sum / mask.sum().clamp_min(1)
        stats = {"nll_sum": float(nll_sum.detach()), "target_tokens": float(mask.sum()),
                 "tokens": float(batch["attention_mask"].sum())}
        if ranked:
            rank_nll, first = self._ranking(tok_lp.sum(-1), features)
            if len(rank_nll):
                loss = loss + self.rank_weight * rank_nll.mean()
            stats.update(rank_nll_sum=float(rank_nll.detach().sum()), rank_correct=float(first.sum()),
                         rank_steps=float(len(first)))
        return loss, stats

    def eval_stats(self, model, features, weights, ctx) -> dict[str, float]:
        import torch

        mbs = int(ctx.config["train"]["per_device_batch_size"])
        out = {"nll_sum": 0.0, "target_tokens": 0.0, "rank_nll_sum": 0.0, "rank_correct": 0.0, "rank_steps": 0.0}
        with torch.no_grad():
            for i in range(0, len(features), mbs):
                chunk = features[i : i + mbs]
                tok_lp, batch = self._forward(model, chunk, ctx, with_negatives=True)
                n = len(chunk)
                w = torch.tensor(weights[i : i + mbs], device=tok_lp.device, dtype=tok_lp.dtype)
                out["nll_sum"] -= float((tok_lp[:n] * w[:, None]).sum())
                out["target_tokens"] += float((batch["loss_mask"][:n] * w[:, None]).sum())
                rank_nll, first = self._ranking(tok_lp.sum(-1), chunk)
                wr = w[[j for j, f in enumerate(chunk) if f["negatives"]]]
                out["rank_nll_sum"] += float((rank_nll * wr).sum())
                out["rank_correct"] += float((first.to(wr.dtype) * wr).sum())
                out["rank_steps"] += float(wr.sum())
        return out

    @staticmethod
    def summarize(sums: dict[str, float]) -> dict[str, float]:
        out = {"loss": sums.get("nll_sum", 0.0) / max(1.0, sums.get("target_tokens", 0.0))}
        if sums.get("rank_steps"):
            out["rank_loss"] = sums["rank_nll_sum"] / sums["rank_steps"]
            out["rank_acc"] = sums["rank_correct"] / sums["rank_steps"]
        if "tokens" in sums:
            out["tokens"] = sums["tokens"]
        return out


def labelled_steps(cfg: R2VConfig):
    """The teacher step shards as one Arrow table with a `label` column: the teacher's choice at the state (the
    executed action on teacher steps, the recorded oracle action on exploration detours, so BC also learns to
    recover); rows without one are dropped. Returns (table, files read)."""
    import pyarrow.compute as pc

    from r2v.data import ShardStore
    from r2v.experiment import Experiment

    store = ShardStore(Experiment(cfg).rollouts("teacher"), "steps")
    files = store.files()
    if not files:
        raise R2VError(f"no teacher step shards under {store.root}: run `r2v collect-teacher` first")
    table = store.read(["split", "goal", "history", "observation", "action", "actor", "oracle_action",
                        "admissible", "episode_id", "step"])
    actor = table["actor"]
    label = pc.utf8_trim_whitespace(pc.if_else(pc.equal(actor, "teacher"), table["action"],
                                               pc.if_else(pc.equal(actor, "explore"), table["oracle_action"], None)))
    table = table.append_column("label", label)
    keep = pc.fill_null(pc.greater(pc.utf8_length(label), 0), False)
    table = table.filter(keep)
    if not pc.any(pc.equal(table["split"], "train")).as_py():
        raise R2VError(f"no teacher steps with split=train and a non-empty action under {store.root}; "
                       "re-run `r2v collect-teacher`")
    return table, files


def bc_examples(cfg: R2VConfig, steps=None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Path]]:
    """(train, val) prompt/completion examples from the teacher step shards (`steps`: `labelled_steps(cfg)`
    when already read), and the files read."""
    from r2v.policies.prompts import completion, prompt_chars, prompt_from_row

    table, files = steps or labelled_steps(cfg)
    rank_mode = cfg.policy.mode == "rank"
    train, val = [], []
    for row in table.to_pylist():
        action = row["label"]
        ex = {"prompt": prompt_from_row(row, cfg.policy.history_steps, **prompt_chars(cfg.policy)),
              "completion": completion(action)}
        others = [a for a in dict.fromkeys(row.get("admissible") or []) if a.strip() != action] if rank_mode else []
        if row["split"] == "train":
            if cfg.bc.rank_weight > 0 and others:  # a fixed random subset per step (reproducible runs)
                rng = random.Random(f"{cfg.bc.seed}:{row['episode_id']}:{row['step']}")
                ex["negatives"] = [completion(a) for a in rng.sample(others, min(len(others), cfg.bc.rank_negatives))]
            train.append(ex)
        elif row["split"] == "val":
            ex["negatives"] = [completion(a) for a in others]  # held-out ranking accuracy over every command
            val.append(ex)
    if 0 < cfg.bc.max_val_steps < len(val):  # scoring every command of every held-out step each epoch is costly
        val = random.Random(cfg.bc.seed).sample(val, cfg.bc.max_val_steps)
    return train, val, files


def run_train_bc(cfg: R2VConfig) -> dict[str, Any]:
    """Pipeline stage `train-bc`: base model `model.path` -> `<experiment>/models/bc`."""
    from r2v.experiment import Experiment
    from r2v.policies.prompts import prompt_chars

    steps = labelled_steps(cfg)
    train, val, files = bc_examples(cfg, steps)
    if cfg.bc.keep_epoch != "last" and not val:
        raise R2VError(f"`bc.keep_epoch={cfg.bc.keep_epoch}` picks the epoch on held-out teacher steps, and the "
                       "teacher shards have no split=val step: collect teacher episodes on the val games "
                       "(`r2v collect-teacher`) or set `bc.keep_epoch=last`")
    out = Experiment(cfg).model("bc")
    worker = None
    if cfg.bc.trainer == "trl":  # TRL's SFTTrainer reads the Arrow table itself (datasets.Dataset, no row copies)
        import pyarrow.compute as pc

        from r2v.train.trl_sft import sft_worker

        table = steps[0]
        train, worker = table.filter(pc.equal(table["split"], "train")), sft_worker
    return fit(cfg, kind="bc", objective_cls=SFTObjective, train=cfg.bc, model_path=cfg.model.path, out_dir=out,
               train_examples=train, val_examples=val,
               extra={"history_steps": cfg.policy.history_steps, "prompt_chars": prompt_chars(cfg.policy)},
               data_files=files, worker=worker)


__all__ = ["run_train_bc", "bc_examples", "SFTObjective"]
