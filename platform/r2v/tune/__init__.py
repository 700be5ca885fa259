"""Ray Tune sweeps over the router's risk/cost hyper-parameters and escalation budgets (`r2v sweep`).

`run_sweep(cfg)` trains one router per trial on cached router rows, scores it on validation with an
offline estimate (r2v.tune.estimator), writes the Pareto frontier and one `best-<budget>.yaml` per
budget under runs/<exp>/sweep/, and optionally re-measures the chosen points live.
"""
from r2v.tune.estimator import ESTIMATOR, ValEpisodes
from r2v.tune.sweep import load_best, pareto_mask, run_sweep

__all__ = ["run_sweep", "load_best", "pareto_mask", "ValEpisodes", "ESTIMATOR"]
