"""`train-bc`: behavioural cloning (SFT) of the SLM on teacher steps, on Ray Train + DeepSpeed ZeRO.

Data: the teacher step shards (`rollouts/teacher`), rows with actor == "teacher" and a non-empty action.
Split column `train` is trained on, `val` gives the held-out loss each epoch. Each row becomes
prompt = `prompt_from_row(row, policy.history_steps)`, completion = `completion(action)` + eos; the prompt
is cut from the left so the sequence fits `model.max_context_tokens`; the loss (token-mean cross-entropy)
is on the completion tokens only.

Loop: a plain `deepspeed.initialize` loop inside `ray.train.torch.TorchTrainer` (r2v.train.common) —
simpler to make exactly resumable than TRL's SFTTrainer under Ray Train V2, and shared with DPO.
LoRA (`model.lora.enabled`): the adapter is trained and **merged** into the base weights when the final
model is written, so `models/bc` is always a plain HF causal-LM directory.
Output: `<experiment>/models/bc` (weights + tokenizer); per-epoch train loss, val loss and tokens/s in
the returned summary (and in MLflow when a run is active).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from r2v.config import R2VConfig
from r2v.errors import R2VError
from r2v.train.common import encode, fit, pad_batch, token_logps


class SFTObjective:
    """Token-mean cross-entropy on completion tokens."""

    name = "bc"

    def __init__(self, config: dict[str, Any]):
        self.max_tokens = int(config["max_tokens"])

    def encode(self, tokenizer, example: dict[str, Any]) -> dict[str, Any]:
        return encode(tokenizer, example["prompt"], example["completion"], self.max_tokens)

    def prepare(self, ctx) -> None:
        pass

    def _token_nll(self, model, features, ctx):
        batch = pad_batch(features, ctx.pad_id, ctx.device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = -token_logps(logits, batch["input_ids"]) * batch["loss_mask"]
        return nll, batch

    def loss(self, model, features, ctx):
        nll, batch = self._token_nll(model, features, ctx)
        n = batch["loss_mask"].sum()
        loss = nll.sum() / n.clamp_min(1)
        stats = {"nll_sum": float(nll.sum().detach()), "target_tokens": float(n),
                 "tokens": float(batch["attention_mask"].sum())}
        return loss, stats

    def eval_stats(self, model, features, weights, ctx) -> dict[str, float]:
        import torch

        mbs = int(ctx.config["train"]["per_device_batch_size"])
        out = {"nll_sum": 0.0, "target_tokens": 0.0}
        with torch.no_grad():
            for i in range(0, len(features), mbs):
                nll, batch = self._token_nll(model, features[i : i + mbs], ctx)
                w = torch.tensor(weights[i : i + mbs], device=nll.device, dtype=nll.dtype)[:, None]
                out["nll_sum"] += float((nll * w).sum())
                out["target_tokens"] += float((batch["loss_mask"] * w).sum())
        return out

    @staticmethod
    def summarize(sums: dict[str, float]) -> dict[str, float]:
        out = {"loss": sums.get("nll_sum", 0.0) / max(1.0, sums.get("target_tokens", 0.0))}
        if "tokens" in sums:
            out["tokens"] = sums["tokens"]
        return out


def bc_examples(cfg: R2VConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Path]]:
    """(train, val) prompt/completion examples from the teacher step shards, and the files read."""
    from r2v.data import ShardStore
    from r2v.policies.prompts import completion, prompt_from_row
    from r2v.rollout.stage import rollout_dir

    store = ShardStore(rollout_dir(cfg, "teacher"), "steps")
    files = store.files()
    if not files:
        raise R2VError(f"no teacher step shards under {store.root}: run `r2v collect-teacher` first")
    table = store.read(["split", "goal", "history", "observation", "action", "actor", "oracle_action"])
    train, val = [], []
    for row in table.to_pylist():
        # the label is the teacher's choice at this state: the executed action on teacher steps, the
        # recorded oracle action on exploration detours (so BC also learns to recover)
        if row.get("actor") == "teacher":
            action = (row.get("action") or "").strip()
        elif row.get("actor") == "explore":
            action = (row.get("oracle_action") or "").strip()
        else:
            continue
        if not action:
            continue
        ex = {"prompt": prompt_from_row(row, cfg.policy.history_steps), "completion": completion(action)}
        if row["split"] == "train":
            train.append(ex)
        elif row["split"] == "val":
            val.append(ex)
    if not train:
        raise R2VError(f"no teacher steps with split=train and a non-empty action under {store.root}; "
                       "re-run `r2v collect-teacher`")
    return train, val, files


def run_train_bc(cfg: R2VConfig) -> dict[str, Any]:
    """Pipeline stage `train-bc`: base model `model.path` -> `<experiment>/models/bc`."""
    train, val, files = bc_examples(cfg)
    out = cfg.experiment_dir / "models" / "bc"
    return fit(cfg, kind="bc", objective_cls=SFTObjective, train=cfg.bc, model_path=cfg.model.path, out_dir=out,
               train_examples=train, val_examples=val, extra={"history_steps": cfg.policy.history_steps},
               data_files=files)


__all__ = ["run_train_bc", "bc_examples", "SFTObjective"]
