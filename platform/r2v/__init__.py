"""r2v: risk-calibrated step-level routing between a small local model and a teacher LLM."""

__version__ = "0.1.0"
