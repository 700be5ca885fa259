"""The router: step features, the calibrated CVaR-constrained risk model, thresholds and baseline routers.
Plain Python + torch, no Ray: rollouts, sweeps, eval and serve call into it."""
from r2v.router.baselines import ROUTERS, Router, load_router, make_router, rows_from_matrix, save_router
from r2v.router.features import FEATURE_NAMES, FEATURE_VERSION, FeatureTracker, features_by_name, vector_from_dict
from r2v.router.model import RiskModel, RouterData
from r2v.router.thresholds import bayes_threshold, budget_threshold, calibrate, cvar_threshold, realised_rate

__all__ = ["FEATURE_NAMES", "FEATURE_VERSION", "FeatureTracker", "features_by_name", "vector_from_dict", "RiskModel",
           "RouterData", "Router", "ROUTERS", "make_router", "load_router", "save_router", "rows_from_matrix",
           "bayes_threshold", "budget_threshold", "cvar_threshold", "calibrate", "realised_rate"]
