"""DeepSpeed configs, built by functions (never hand-written JSON), after OpenRLHF's deepspeed_utils.py.

* `train_ds_config` — a model that is optimised: ZeRO stage from config, AdamW from torch (`torch_adam`, so
  no CPUAdam/FusedAdam op is compiled on a CPU box), bf16 on GPUs, fp32 on CPU, gradient clipping, and
  `stage3_gather_16bit_weights_on_model_save` so ZeRO-3 weights can be consolidated into a servable HF dir.
* `trl_ds_config` — the same ZeRO section for an HF/TRL trainer, batch and optimiser values "auto".
* `eval_ds_config` — a frozen model used only for forward passes (DPO's reference): no optimizer, ZeRO-3
  parameter partitioning when training uses ZeRO-3 (so a large reference is sharded like the policy),
  stage 0 otherwise (ZeRO-1/2 only shard optimizer state and gradients, which a frozen model has none of).
"""
from __future__ import annotations

from typing import Any


def _zero_section(stage: int, offload: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": False,  # no effect on gloo/CPU; on GPUs it trades memory for speed
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e7,
        "allgather_bucket_size": 5e7,
    }
    if stage == 3:
        zero.update(
            stage3_param_persistence_threshold=1e4,
            stage3_prefetch_bucket_size=5e7,
            stage3_max_live_parameters=1e9,
            stage3_max_reuse_distance=1e9,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if offload and stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def train_ds_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    world_size: int,
    gradient_accumulation_steps: int = 1,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    bf16: bool = False,
    grad_clip: float = 1.0,
    offload: bool = False,
    total_steps: int | None = None,
    warmup_ratio: float = 0.05,
) -> dict[str, Any]:
    """The config `deepspeed.initialize` gets for a trained model (policy). With `total_steps` (optimizer steps)
    the learning rate warms up linearly over `warmup_ratio` of them and decays linearly to 0 at the end
    (DeepSpeed WarmupDecayLR, saved in and restored from its checkpoints); without, it is constant."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": _zero_section(zero_stage, offload),
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": learning_rate, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": weight_decay,
                       "torch_adam": True},
        },
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if total_steps:
        config["scheduler"] = {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": learning_rate, "warmup_type": "linear",
            "warmup_num_steps": max(1, round(warmup_ratio * total_steps)), "total_num_steps": max(2, total_steps)}}
    return config


def eval_ds_config(*, zero_stage: int, micro_batch_size: int, world_size: int, bf16: bool = False,
                   offload: bool = False) -> dict[str, Any]:
    """The config for a frozen model (no optimizer): ZeRO-3 partitioning if training uses ZeRO-3, else stage 0."""
    stage = 3 if zero_stage == 3 else 0
    zero = _zero_section(stage, offload=False)
    if offload and stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def trl_ds_config(zero_stage: int) -> dict[str, Any]:
    """DeepSpeed config for an HF/TRL trainer: ZeRO from config, every batch/optimiser value "auto" (filled from
    `SFTConfig`: a concrete value that disagrees with it is an error); the trainer builds AdamW and the
    linear warm-up/decay schedule and hands them to DeepSpeed."""
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": _zero_section(zero_stage, offload=False),
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": "auto"},
        "steps_per_print": 10**9,
    }


__all__ = ["train_ds_config", "eval_ds_config", "trl_ds_config"]
