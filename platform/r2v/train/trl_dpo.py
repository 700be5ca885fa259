"""DPO on TRL's `DPOTrainer` inside Ray Train (`dpo.trainer: trl`): the paper's objective on the ecosystem's trainer.

The objective is the own loop's, term for term (r2v.train.dpo: `dpo_weight`·TRL's sigmoid DPO loss + `bc_weight`·
NLL(chosen) + `consistency_weight`·JSD over peer prompts, each 0 switching its term and its work off), so the two
trainers optimise the same loss and report the same `val_*` numbers; the Ray Train + DeepSpeed set-up, checkpoints,
resume after a worker failure, epoch rows, best-validation-epoch weights and the final save are BC's
(r2v.train.trl_common).

* Data: the pairs as one Arrow table in the object store; each rank wraps it in a `datasets.Dataset` and `map`s it
  to token ids with `DPOObjective.encode` (prompt cut from the left by `encode_pair`, the split scoring uses), plus
  the peer prompt's chosen sequence for the consistency term. `DPOTrainer._prepare_dataset` (which tokenizes text and
  truncates the *end* of long sequences, cutting the action) is skipped.
* Reference log-probs: precomputed before the policy exists, as the own loop does (`DPOObjective.prepare`: the frozen
  `models/bc` under `eval_ds_config`, each rank its share, then all-gathered into the dataset's `ref_chosen` /
  `ref_rejected` columns), and `precompute_ref_log_probs=True` so `DPOTrainer` keeps no reference model. TRL's own
  precompute is not used: it caches the log-probs in an Arrow file that rank 0 writes and every rank reads back, and
  for an in-memory dataset each rank names that file with its own random fingerprint in its own temp directory
  (`Dataset._get_cache_file_path`: two calls on one in-memory dataset gave two different paths, datasets 5.2), so
  ranks ≥ 1 cannot find it; across nodes it would need a shared disk too.
* Loss (`R2VDPOTrainer.compute_loss`): one forward over [chosen; rejected; chosen under the peer prompt] rows
  (`r2v.train.dpo.dpo_loss`). Stock `DPOTrainer._compute_loss` cannot carry the consistency term (its fused LM head
  returns per-token log-probs, never the logits a JSD needs, and its batch is [chosen; rejected] only), and it
  gathers and `.item()`s ~12 metric scalars on every step; the epoch sums are kept instead (`epoch_sums`).
"""
from __future__ import annotations

from typing import Any

from r2v.errors import R2VError
from r2v.train.common import load_model, lora_config, rank_partition
from r2v.train.trl_common import epoch_end_callback, train_and_report, trainer_args, trl_setup

REF_COLUMNS = ("ref_chosen", "ref_rejected")


def pair_dataset(table, objective, ctx):
    """`datasets.Dataset` over the Arrow table of pairs → token ids (+ peer) and the reference log-probs."""
    import datasets
    import torch.distributed as dist

    from r2v.train.dpo import encode_example

    tokenizer, max_tokens = ctx.tokenizer, objective.max_tokens  # all the map function holds (datasets hashes it)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in ("chosen_ids", "chosen_n", "rejected_ids", "rejected_n", "peer_ids",
                                                 "peer_n")}
        for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
            enc = encode_example(tokenizer, row, max_tokens)
            for name in ("chosen", "rejected", "peer"):
                seq = enc[name] or {"input_ids": [], "n_prompt": 0}  # no peer: an empty sequence
                out[f"{name}_ids"].append(seq["input_ids"])
                out[f"{name}_n"].append(seq["n_prompt"])
        return out

    ds = datasets.Dataset(table)
    ds = ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenize preference pairs")
    idx, ctx.train_weights = rank_partition(len(ds), ctx.rank, ctx.world, int(ctx.config["train"]["seed"]))
    ctx.train_features = features(ds.select(idx))
    objective.prepare(ctx)  # reference log-probs of this rank's share (and of its val pairs), before the policy
    mine = [(i, f["ref_chosen"], f["ref_rejected"]) for i, f in zip(idx, ctx.train_features)]
    parts: list[Any] = [None] * ctx.world
    dist.all_gather_object(parts, mine)
    ref = {i: (c, r) for part in parts for i, c, r in part}
    ctx.train_features = []
    return (ds.add_column(REF_COLUMNS[0], [ref[i][0] for i in range(len(ds))])
              .add_column(REF_COLUMNS[1], [ref[i][1] for i in range(len(ds))]))


def features(rows) -> list[dict[str, Any]]:
    """Dataset rows → the encoded-pair dicts `dpo_loss` reads (`peer` None where the pair has none)."""
    out = []
    for row in rows:
        f = {name: {"input_ids": row[f"{name}_ids"], "n_prompt": row[f"{name}_n"]} for name in ("chosen", "rejected")}
        f["peer"] = {"input_ids": row["peer_ids"], "n_prompt": row["peer_n"]} if row["peer_ids"] else None
        for key in REF_COLUMNS:
            if key in row:
                f[key] = row[key]
        out.append(f)
    return out


def collate_pairs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The trainer's batch: the encoded pairs; `dpo_loss` pads [chosen; rejected; peer] rows itself."""
    return {"pairs": features(rows)}


def r2v_dpo_trainer():
    """`DPOTrainer` with the paper's objective (see the module doc): TRL's trainer loop, DeepSpeed/PEFT set-up,
    dropout handling and reference-free training on precomputed log-probs; our loss and data."""
    from trl import DPOTrainer

    class R2VDPOTrainer(DPOTrainer):
        def __init__(self, *args, objective, ctx, **kwargs):
            self.objective, self.ctx = objective, ctx
            self.epoch_sums: dict[str, float] = {}
            super().__init__(*args, **kwargs)

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # tokenized by `pair_dataset` with our token split

        def _precompute_ref_logps(self, dataset, name, batch_size):
            missing = [c for c in REF_COLUMNS if c not in dataset.column_names]
            if missing:
                raise R2VError(f"the {name} pairs lack the reference log-probs {missing}: build them with pair_dataset")
            return dataset

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs:
                raise R2VError("dpo.trainer=trl computes the loss only; evaluation runs through DPOObjective.eval_stats")
            loss, stats = self.objective.loss(model, inputs["pairs"], self.ctx)
            for k, v in stats.items():
                self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v
            return loss

        def summarize(self, sums: dict[str, float]) -> dict[str, float]:
            return self.objective.summarize(sums)

    return R2VDPOTrainer


def dpo_worker(config: dict[str, Any]) -> None:
    """The Ray Train per-worker function of `dpo.trainer: trl`."""
    objective, ctx, nodes = trl_setup(config)  # first: it tells DeepSpeed about a CPU-only box before any import
    import ray
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from trl import DPOConfig

    train_ds = pair_dataset(ray.get(config["train_ref"]), objective, ctx)
    args = DPOConfig(**trainer_args(config, ctx), beta=objective.beta, loss_type=["sigmoid"],
                     precompute_ref_log_probs=True)
    model = load_model(config["model_path"], None, int(config["train"]["seed"]))  # LoRA: DPOTrainer's peft_config
    epoch_end = epoch_end_callback(objective, ctx)
    trainer = r2v_dpo_trainer()(model=model, args=args, train_dataset=train_ds, processing_class=ctx.tokenizer,
                                data_collator=collate_pairs, peft_config=lora_config(config.get("lora")),
                                callbacks=[epoch_end, RayTrainReportCallback()], objective=objective, ctx=ctx)
    epoch_end.trainer = trainer
    train_and_report(prepare_trainer(trainer), epoch_end, objective, ctx, nodes)


__all__ = ["collate_pairs", "dpo_worker", "features", "pair_dataset", "r2v_dpo_trainer"]
