"""One place that starts or joins Ray, so every stage runs the same on a laptop and on a cluster."""
from __future__ import annotations

import os

from r2v.config import R2VConfig


def init_ray(cfg: R2VConfig):
    """Join `ray.address` when set (a cluster, or the head a `ray job submit` runs under), else start an
    embedded Ray sized by `ray.num_cpus`. Idempotent."""
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs = {"ignore_reinit_error": True, "log_to_driver": True}
    if cfg.ray.runtime_env:
        kwargs["runtime_env"] = dict(cfg.ray.runtime_env)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, **kwargs)
    return ray
