"""Step verifiers: score candidate next actions in [0, 1] (rule/execution-based per env, or learned)."""
from r2v.verifier.base import Verifier, annotate, auroc, context_from_row, make_verifier

__all__ = ["Verifier", "make_verifier", "annotate", "context_from_row", "auroc"]
