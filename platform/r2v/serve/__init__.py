"""Serving the routed agent with Ray Serve (HTTP, OpenAI-compatible): see r2v.serve.app.

`run_serve(cfg)` is the `r2v serve` command; `build_app(cfg, models_dir)` returns the Serve application;
`app_builder` is the import path for `serve run conf/serve.yaml`. Ray is imported only when these are used.
"""
from __future__ import annotations

from typing import Any

__all__ = ["build_app", "run_serve", "app_builder", "start"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from r2v.serve import app

        return getattr(app, name)
    raise AttributeError(name)
