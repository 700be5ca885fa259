"""BC on TRL's `SFTTrainer` inside Ray Train (`bc.trainer: trl`): the ecosystem's trainer on our data.

Same contract as the own DeepSpeed loop (r2v.train.common); what it shares with `dpo.trainer: trl` (Ray Train +
DeepSpeed set-up, checkpoints and resume, the epoch rows, the final save) is in r2v.train.trl_common.

* Data: the teacher step shards as one Arrow table in the object store; each rank wraps it in a
  `datasets.Dataset` (no row copies) and `map`s it to `input_ids` + `labels` (−100 on the prompt) with the
  token split scoring uses (`r2v.policies.prompts.encode_pair`), so TRL trains on exactly our completion tokens.
* Validation: at each epoch's end every rank scores its share of the held-out steps with `SFTObjective.eval_stats`
  (val loss and the rank accuracy a rank-mode policy acts with: one definition for both trainers).
* Per-step cost: `lean_sft_trainer` (below) drops what stock TRL 1.16 adds to every step on top of the loss.
"""
from __future__ import annotations

from typing import Any

from r2v.train.common import load_model
from r2v.train.trl_common import epoch_end_callback, train_and_report, trainer_args, trl_setup


def tokenized_dataset(table, tokenizer, history_steps: int, max_tokens: int, chars: dict[str, int]):
    """`datasets.Dataset` over the Arrow table of labelled teacher steps → input_ids and labels (prompt = −100)."""
    import datasets

    from r2v.policies.prompts import completion, encode_pair, prompt_from_row

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": []}
        for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
            ids, n_prompt = encode_pair(tokenizer, prompt_from_row(row, history_steps, **chars),
                                        completion(row["label"]), max_tokens)
            out["input_ids"].append(ids)
            out["labels"].append([-100] * n_prompt + ids[n_prompt:])
        return out

    ds = datasets.Dataset(table)
    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenize teacher steps")


def completion_logits_mask(labels):
    """Positions whose *next* token is a label (not −100): the only logits the loss reads. A boolean
    `(batch, seq)` mask, the form HF causal LMs take as `logits_to_keep` (output flattened to `(n, vocab)`)."""
    import torch

    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep


def lean_sft_trainer():
    """`SFTTrainer` with the per-step work our loop does not do taken out (same updates, same loss).

    Why (TRL 1.16 ran at 0.62× the own loop's tokens/s in `bench/train_throughput.py`): stock
    `SFTTrainer.compute_loss`, on every training step,
      * runs TRL's fused LM head (`add_fused_lm_head`), which off CUDA/XPU projects *every* position (prompt and
        padding included; it compacts to the label positions only under Triton), folds entropy and top-1 over the
        full vocabulary for its `entropy` / `mean_token_accuracy` metrics, and recomputes the projection in
        backward. One process, one thread, 16 quickstart steps (2.1k tokens, 48 of them completion), the
        quickstart's 2-layer model (vocab 1642): forward + backward 0.53 s with it vs 0.32 s for the own loop's
        full logits, i.e. 0.61× (the gap the bench saw), and 0.21 s with the completion logits only (same loss);
      * gathers four metric scalars across ranks and `.item()`s them (a host sync per gather).
    And `SFTConfig` turns activation (gradient) checkpointing on by default, a second forward in every backward
    (py-spy on a rank: ~8% of its samples in the recompute); `sft_worker` turns it off (the own loop runs without it).
    This subclass asks the model's own forward for the logits of the completion positions only (a boolean
    `logits_to_keep`, transformers ≥ 5), takes TRL's loss on them (summed NLL / `num_items_in_batch`, × ranks with
    `average_tokens_across_devices`), and keeps the epoch's NLL and token sums as tensors (no sync) for the epoch
    row (`epoch_sums`, all-reduced once per epoch). With it, `SFTConfig` logs nothing per step (the per-step
    `loss` log is another all-gather + `.item()`, and a print on rank 0). Evaluation, `return_outputs` and TRL's
    other loss variants go to TRL unchanged; a model whose forward has no `logits_to_keep` gives its full logits
    (masked the same way). The epoch loss is the token-mean NLL, the own loop's definition."""
    import inspect

    import torch
    import torch.nn.functional as F
    from trl import SFTTrainer

    class LeanSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            self.keep_logits = "logits_to_keep" in inspect.signature(type(base).forward).parameters
            # TRL's loss variants (DFT, label smoothing, a custom loss, MoE aux loss) stay TRL's
            self.lean = (self.args.loss_type == "nll" and self.label_smoother is None
                         and self.compute_loss_func is None and not self.aux_loss_enabled)
            self.epoch_sums: dict[str, Any] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or not self.model.training or not self.lean:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"]
            keep = completion_logits_mask(labels)
            targets = labels[:, 1:][keep[:, :-1]]
            fwd = {k: v for k, v in inputs.items() if k != "labels"}
            logits = model(**fwd, use_cache=False, **({"logits_to_keep": keep} if self.keep_logits else {})).logits
            if not self.keep_logits:
                logits = logits[keep]
            nll = F.cross_entropy(logits.float(), targets, reduction="sum")
            n = targets.numel()
            loss = nll / torch.as_tensor(n if num_items_in_batch is None else num_items_in_batch).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            sums = self.epoch_sums
            for key, value in (("nll_sum", nll.detach()), ("target_tokens", n),
                               ("tokens", inputs["attention_mask"].sum() if "attention_mask" in inputs
                                else labels.numel())):
                sums[key] = sums.get(key, 0) + value
            return loss

        @staticmethod
        def summarize(sums: dict[str, float]) -> dict[str, float]:
            """The epoch row from all ranks' `epoch_sums`: the token-mean NLL (the own loop's loss) and the tokens."""
            out = {"loss": sums["nll_sum"] / sums["target_tokens"]} if sums.get("target_tokens") else {}
            return {**out, "tokens": sums.get("tokens", 0.0)}

    return LeanSFTTrainer


def sft_worker(config: dict[str, Any]) -> None:
    """The Ray Train per-worker function of `bc.trainer: trl`."""
    objective, ctx, nodes = trl_setup(config)  # first: it tells DeepSpeed about a CPU-only box before any import
    import ray
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from trl import SFTConfig

    objective.prepare(ctx)
    train_ds = tokenized_dataset(ray.get(config["train_ref"]), ctx.tokenizer, int(config["history_steps"]),
                                 int(config["max_tokens"]), config["prompt_chars"])
    args = SFTConfig(**trainer_args(config, ctx), max_length=int(config["max_tokens"]),
                     dataset_kwargs={"skip_prepare_dataset": True})
    model = load_model(config["model_path"], config.get("lora"), int(config["train"]["seed"]))
    epoch_end = epoch_end_callback(objective, ctx)
    trainer = lean_sft_trainer()(model=model, args=args, train_dataset=train_ds, processing_class=ctx.tokenizer,
                                 callbacks=[epoch_end, RayTrainReportCallback()])
    epoch_end.trainer = trainer
    train_and_report(prepare_trainer(trainer), epoch_end, objective, ctx, nodes)


__all__ = ["completion_logits_mask", "lean_sft_trainer", "sft_worker", "tokenized_dataset"]
