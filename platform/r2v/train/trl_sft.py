"""BC on TRL's `SFTTrainer` inside Ray Train (`bc.trainer: trl`): the ecosystem's trainer on our data.

Same contract as the own DeepSpeed loop (r2v.train.common): the driver's `fit` starts a `TorchTrainer`, every
rank trains under DeepSpeed ZeRO (the config goes to `SFTConfig.deepspeed` with "auto" batch/optimiser values,
so the trainer and DeepSpeed agree on them), the final checkpoint holds `hf/` (consolidated, LoRA merged) and
`trainer_state.json` with the per-epoch history, and `models/bc` is a plain HF directory.

* Data: the teacher step shards as one Arrow table in the object store; each rank wraps it in a
  `datasets.Dataset` (no row copies) and `map`s it to `input_ids` + `labels` (−100 on the prompt) with the
  token split scoring uses (`r2v.policies.prompts.encode_pair`), so TRL trains on exactly our completion tokens.
* Checkpoints: `RayTrainReportCallback` copies every rank's HF checkpoint (weights, optimiser, DeepSpeed shards,
  trainer state) into Ray Train's storage on every save (`ray.train.huggingface.transformers.prepare_trainer`);
  after a worker failure Ray restarts the group and `trainer.train(resume_from_checkpoint=...)` continues there.
* Validation: at each epoch's end every rank scores its share of the held-out steps with `SFTObjective.eval_stats`
  (val loss and the rank accuracy a rank-mode policy acts with: one definition for both trainers).
* Per-step cost: `lean_sft_trainer` (below) drops what stock TRL 1.16 adds to every step on top of the loss.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from r2v.train.common import (
    HF_SUBDIR, STATE_FILE, WorkerContext, epoch_line, gather_state_dict, init_deepspeed_distributed, load_model,
    rank_partition, save_hf, setup_accelerator_env, validate,
)
from r2v.train.deepspeed_config import trl_ds_config

HISTORY_KEY = "r2v_epoch"  # our per-epoch rows live in the HF trainer state's log_history (restored on resume)


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

    return LeanSFTTrainer


def sft_worker(config: dict[str, Any]) -> None:
    """The Ray Train per-worker function of `bc.trainer: trl`."""
    setup_accelerator_env()
    import ray
    import ray.train
    import ray.train.torch
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig

    tc = ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    device = ray.train.torch.get_device()
    init_deepspeed_distributed(device)
    train: dict[str, Any] = config["train"]
    seed = int(train["seed"])
    objective = config["objective_cls"](config)
    tokenizer = AutoTokenizer.from_pretrained(config["model_path"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    ctx = WorkerContext(rank=rank, world=world, device=device, tokenizer=tokenizer, config=config)
    val_examples = ray.get(config["val_ref"]) if config.get("val_ref") is not None else []
    vidx, ctx.val_weights = rank_partition(len(val_examples), rank, world, seed + 1)
    ctx.val_features = [objective.encode(tokenizer, val_examples[i]) for i in vidx]
    objective.prepare(ctx)
    train_ds = tokenized_dataset(ray.get(config["train_ref"]), tokenizer, int(config["history_steps"]),
                                 int(config["max_tokens"]), config["prompt_chars"])
    nodes: list[Any] = [None] * world
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())

    class EpochEnd(TrainerCallback):
        """Held-out loss and rank accuracy per epoch, via the objective both trainers share; the epoch's train loss
        (token-mean NLL, as the own loop reports it) and tokens from the trainer's `epoch_sums`, all-reduced here."""

        def __init__(self):
            self.t0, self.trainer = time.perf_counter(), None

        def on_epoch_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            self.trainer.epoch_sums.clear()

        def on_epoch_end(self, args, state, control, model=None, **kw):
            epoch = round(state.epoch or 0)
            sums = self.trainer.epoch_sums
            keys = ("nll_sum", "target_tokens", "tokens")
            totals = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(totals)
            nll_sum, target_tokens, tokens = totals.tolist()
            row: dict[str, Any] = {"epoch": epoch, "step": state.global_step}
            if target_tokens:
                row["loss"] = nll_sum / target_tokens
            row["tokens"] = tokens  # all ranks, without padding
            row["tokens_per_s"] = row["tokens"] / max(1e-9, time.perf_counter() - self.t0)
            row.update(validate(model, objective, ctx))
            state.log_history.append({HISTORY_KEY: row})
            if rank == 0:
                print(epoch_line(objective.name, row), flush=True)

    work = Path(tempfile.mkdtemp(prefix=f"r2v-trl-sft-r{rank}-"))
    use_gpu = device.type == "cuda"
    args = SFTConfig(
        output_dir=str(work / "hf-checkpoints"),
        per_device_train_batch_size=int(train["per_device_batch_size"]),
        gradient_accumulation_steps=int(train["gradient_accumulation_steps"]),
        num_train_epochs=float(train["epochs"]),
        max_steps=int(train["max_steps"]),
        learning_rate=float(train["learning_rate"]),
        lr_scheduler_type="linear" if train["lr_schedule"] == "linear" else "constant",
        warmup_steps=float(train["warmup_ratio"]) if train["lr_schedule"] == "linear" else 0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
        seed=seed, data_seed=seed,
        bf16=bool(config["bf16"]), use_cpu=not use_gpu,
        deepspeed=trl_ds_config(int(train["zero_stage"])),
        save_strategy="steps", save_steps=int(train["save_steps"]), save_total_limit=2,
        logging_strategy="no", eval_strategy="no", report_to=[],  # the epoch rows are ours (EpochEnd)
        activation_checkpointing=False,  # TRL's SFTConfig turns it on by default: a second forward in backward
        disable_tqdm=True, max_length=int(config["max_tokens"]),
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
    )
    model = load_model(config["model_path"], config.get("lora"), seed)
    epoch_end = EpochEnd()
    trainer = lean_sft_trainer()(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                                 callbacks=[epoch_end, RayTrainReportCallback()])
    epoch_end.trainer = trainer
    trainer = prepare_trainer(trainer)

    resume, resumed_from = None, None
    ckpt = ray.train.get_checkpoint()  # set when Ray restarted the worker group after a failure
    if ckpt is not None:
        with ckpt.as_directory() as d:
            src = Path(d) / RayTrainReportCallback.CHECKPOINT_NAME
            if src.is_dir():  # a mid-run HF checkpoint (the final one, hf/ + state, is never resumed from)
                import shutil

                resume = str(work / "resume")
                shutil.copytree(src, resume)
                resumed_from = json.loads((src / "trainer_state.json").read_text())["global_step"]
                if rank == 0:
                    print(f"[{objective.name}] resumed from checkpoint at step {resumed_from}", flush=True)
    trainer.train(resume_from_checkpoint=resume)

    history = [h[HISTORY_KEY] for h in trainer.state.log_history if HISTORY_KEY in h]
    zero = int(train["zero_stage"])
    sd = gather_state_dict(trainer.model_wrapped, zero, rank)  # a collective under ZeRO-3: every rank calls it
    # the trainer left ZeRO-3 model construction switched on process-wide; rank 0 rebuilds the model alone
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    with tempfile.TemporaryDirectory(prefix="r2v-trl-final-") as d:
        if rank == 0:
            save_hf(sd, config["model_path"], config.get("lora"), tokenizer, Path(d) / HF_SUBDIR)
            (Path(d) / STATE_FILE).write_text(json.dumps({
                "micro": trainer.state.global_step * int(train["gradient_accumulation_steps"]), "history": history,
                "final": True, "resumed_from_step": resumed_from, "trainer": "trl"}))
        ray.train.report({"step": trainer.state.global_step, "history": history, "resumed_from_step": resumed_from,
                          "final": True, "worker_nodes": nodes, "extra": {"trainer": "trl"}},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


__all__ = ["completion_logits_mask", "lean_sft_trainer", "sft_worker", "tokenized_dataset"]
