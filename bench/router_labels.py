"""Router labels and features, offline: which label definition and which features predict held-out risk.

    python -m bench.router_labels [--exp quickstart --runs-dir runs]

Reads the router rows of a finished pipeline (runs/<exp>/router/, written by `collect-router`). For each
label definition (episode: the SLM episode failed; step: the SLM's action differs from the env's reference
action; branch: the teacher taking over here wins where the SLM loses) it fits the risk model on the fit
rows, calibrates on the calibration rows (as train-router does) and scores the *test* rows against the same
label: AUROC, ECE, Brier and the number of labelled held-out steps. Then the ablations at the experiment's
own label: the MLP vs logistic regression (no hidden layer), and without the time features (step,
horizon_frac, context lengths) that could separate the classes without knowing risk. Branch labels exist on
the sampled steps only (scored unweighted here). Last, how well a calibrator can transfer to unseen games at all:
the trained router's out-of-fold logits on the val games (the model's on the calibration games, its cross-fitted
twin's on the fit games) recalibrated by temperature, Platt or isotonic regression under a 6-fold split *by
game* (5 repeats), ECE on the held-out folds; beside it the ECE a perfectly calibrated predictor shows on the
same number of steps (labels drawn from its own p): ECE's sampling floor. Writes runs/bench/router_labels.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any


from bench import MISSING_INPUT, write_result

TIME_FEATURES = ("step", "horizon_frac", "context_chars_log1p", "goal_chars_log1p")
HOW_TO = "make demo   (or: .venv/bin/r2v run --config conf/quickstart.yaml --until collect-router)"


def score(cfg, df, label: str, features: tuple[str, ...], hidden: list[int]) -> dict[str, Any]:
    """Fit on fit rows, calibrate on calibration rows, score held-out test rows, all under `label`."""
    from r2v.eval.metrics import auroc, brier, ece
    from r2v.router.model import RiskModel, RouterData
    from r2v.router.stage import router_part

    rcfg = dataclasses.replace(cfg.router, label=label, hidden_sizes=hidden, features=list(features))

    def data(part):
        return RouterData.from_frame(part, label, source=f"{label} rows")

    fit, cal = data(router_part(cfg, df, "fit")), data(router_part(cfg, df, "calibration"))
    test = data(df[df["split"] == "test"])
    model = RiskModel(cfg=rcfg)
    model.fit(fit, cal, rcfg, seed=cfg.seed)
    p, y = model.predict(test.X), test.y
    return {"label": label, "model": "mlp" if hidden else "logistic", "features": len(model.inputs),
            "fit_rows": len(fit), "test_rows": len(test), "test_positive_rate": float(y.mean()),
            "auroc": float(auroc(p, y)), "ece": float(ece(p, y)), "brier": float(brier(p, y))}


def isotonic(z, y):
    """Pool-adjacent-violators fit of y on z: the best non-decreasing step function, as a predictor."""
    import numpy as np

    order = np.argsort(z, kind="stable")
    values: list[float] = []
    weights: list[float] = []
    for v in np.asarray(y, dtype=np.float64)[order]:
        values.append(v)
        weights.append(1.0)
        while len(values) > 1 and values[-2] > values[-1]:
            v2, w2, v1, w1 = values.pop(), weights.pop(), values.pop(), weights.pop()
            values.append((v1 * w1 + v2 * w2) / (w1 + w2))
            weights.append(w1 + w2)
    fitted = np.repeat(values, np.asarray(weights, dtype=int))
    zs = np.asarray(z)[order]
    return lambda znew: np.interp(znew, zs, fitted)


def calibrators(cfg, df, folds: int = 6, repeats: int = 5) -> list[dict[str, Any]]:
    """Held-out ECE/Brier of each calibrator on the val games' out-of-fold logits, split by game."""
    import numpy as np

    from r2v.eval.metrics import brier, ece
    from r2v.experiment import Experiment
    from r2v.router.baselines import TWIN_DIR
    from r2v.router.model import RiskModel, RouterData, fit_platt, fit_temperature
    from r2v.router.stage import router_part

    saved = Experiment(cfg).model("router")
    if not (saved / "router.json").is_file():
        return []
    parts = [(RiskModel.load(saved), "calibration")]
    if (saved / TWIN_DIR).is_dir():
        parts.append((RiskModel.load(saved / TWIN_DIR), "fit"))
    z, y, games = [], [], []
    for model, part in parts:
        frame = router_part(cfg, df, part)
        data = RouterData.from_frame(frame, cfg.router.label, source=f"router rows ({part})")
        task_of = dict(zip(frame["episode_id"], frame["task_id"]))
        z.append(model.logits(data.X))
        y.append(data.y)
        games += [task_of[e] for e in data.episode]
    z, y, games = np.concatenate(z), np.concatenate(y).astype(np.float64), np.asarray(games)

    def sigmoid(x):
        return 1.0 / (1.0 + np.exp(-x))

    def platt(zt, yt):
        t, b = fit_platt(zt, yt)
        return lambda x: sigmoid(x / t + b)

    def temperature(zt, yt):
        t = fit_temperature(zt, yt)
        return lambda x: sigmoid(x / t)

    rng = np.random.default_rng(cfg.seed)
    unique = np.unique(games)
    rows = []
    for name, fit_fn in (("temperature", temperature), ("platt", platt), ("isotonic", isotonic)):
        scores = []
        for _ in range(repeats):
            p = np.zeros(len(y))
            for held in np.array_split(rng.permutation(unique), folds):
                test = np.isin(games, held)
                p[test] = fit_fn(z[~test], y[~test])(z[test])
            scores.append((ece(p, y), brier(p, y)))
        e, b = np.mean(scores, axis=0)
        rows.append({"calibrator": name, "rows": len(y), "games": len(unique), "ece": float(e), "brier": float(b)})
    p = platt(z, y)(z)  # a perfectly calibrated predictor with these p: its labels drawn from p
    floor = [ece(p, (rng.random(len(p)) < p).astype(float)) for _ in range(200)]
    rows.append({"calibrator": "perfect (ECE floor)", "rows": len(y), "games": len(unique),
                 "ece": float(np.mean(floor)), "brier": None})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exp", default="quickstart")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--config", default="conf/quickstart.yaml")
    ap.add_argument("--out", default="runs/bench/router_labels.json")
    args = ap.parse_args(argv)

    from r2v.config import LABELS, load_config
    from r2v.errors import R2VError
    from r2v.router.features import FEATURE_NAMES
    from r2v.router.stage import read_router_rows

    cfg = load_config(args.config, [f"runs_dir={args.runs_dir}", f"experiment={args.exp}"])
    try:
        df = read_router_rows(cfg)
    except R2VError as e:
        print(f"{e}\nrun the pipeline first: {HOW_TO}")
        return {"status": "missing"}
    hidden = list(cfg.router.hidden_sizes)
    no_time = tuple(f for f in FEATURE_NAMES if f not in TIME_FEATURES)
    rows = [score(cfg, df, label, FEATURE_NAMES, hidden) | {"variant": "all features"} for label in LABELS]
    own = cfg.router.label
    rows.append(score(cfg, df, own, FEATURE_NAMES, []) | {"variant": "logistic regression"})
    rows.append(score(cfg, df, own, no_time, hidden) | {"variant": "without time features"})

    print(f"\nRouter labels and features on held-out test steps ({args.exp}; fit/calibration rows as train-router)")
    print(f"{'label':<9}{'variant':<24}{'model':<10}{'fit rows':>9}{'test rows':>10}{'pos.':>6}"
          f"{'AUROC':>7}{'ECE':>7}{'Brier':>7}")
    for r in rows:
        print(f"{r['label']:<9}{r['variant']:<24}{r['model']:<10}{r['fit_rows']:>9}{r['test_rows']:>10}"
              f"{r['test_positive_rate']:>6.2f}{r['auroc']:>7.3f}{r['ece']:>7.3f}{r['brier']:>7.3f}")
    cal = calibrators(cfg, df)
    if cal:
        print(f"\nCalibrators on the val games' out-of-fold logits ({cal[0]['rows']} steps of {cal[0]['games']} games), "
              "held out by game (6 folds x 5):")
        for r in cal:
            print(f"{r['calibrator']:<22}ECE {r['ece']:.3f}" + ("" if r["brier"] is None else f"  Brier {r['brier']:.3f}"))
    result = {"status": "ok", "experiment": args.exp, "router_label": own, "rows": rows, "calibrators": cal}
    return write_result(args.out, result)


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:]).get("status") == "ok" else MISSING_INPUT)
