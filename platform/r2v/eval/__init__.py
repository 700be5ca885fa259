"""Evaluation: metrics (success + bootstrap CI, worst-seed, CVaR, calibration, cost), plots, reports."""
from r2v.eval.metrics import (SUMMARY_KEYS, auroc, brier, cost, cvar_failure, ece, success_with_ci, summarise_method,
                              worst_seed_success)

__all__ = ["success_with_ci", "worst_seed_success", "cvar_failure", "ece", "brier", "auroc", "cost",
           "summarise_method", "SUMMARY_KEYS"]
