"""Quickstart stage times: per-stage wall time of a finished pipeline run, from its completion markers.

    python -m bench.quickstart_stages [--exp quickstart --runs-dir runs]

Reads runs/<exp>/.stages/<stage>.json (written by `r2v run` when a stage finishes: wall_s, finished_at,
summary) in pipeline order and prints one row per stage with its headline numbers. Nothing is re-run: to
produce the markers, run the quickstart first (`make demo`). A stage re-run alone (`r2v run --from X`)
rewrites only its own marker, so `finished_at` shows which run each number comes from. A stage that finished
before an upstream one is marked: up to date when that upstream re-ran with the same products (`*`), stale when
an upstream marker no longer matches the digest it recorded, the test `r2v run` re-runs on (`!`).
Writes runs/bench/quickstart_stages.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench import MISSING_INPUT, write_result

HOW_TO = "make demo   (or: .venv/bin/r2v run --config conf/quickstart.yaml)"

# the summary keys worth a glance, per stage (the rest stays in the JSON)
HEADLINE = {
    "tasks": ("n_train", "n_val", "n_test"),
    "collect-teacher": ("episodes_run", "steps", "success_rate", "steps_per_s"),
    "init-model": ("params", "vocab"),
    "train-bc": ("steps",),
    "build-pairs": ("pairs", "probe_episodes"),
    "train-dpo": ("steps",),
    "train-verifier": (),
    "collect-router": (),
    "train-router": (),
    "sweep": ("trials", "pareto_points"),
    "eval": ("r2v_success", "r2v_llm_call_rate"),
    "report": ("methods",),
}


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def headline(stage: str, summary: dict[str, Any], limit: int = 4) -> str:
    """A few scalar summary items: the stage's preferred keys first, then other scalars."""
    if not isinstance(summary, dict):
        return ""
    keys = [k for k in HEADLINE.get(stage, ()) if k in summary]
    keys += [k for k, v in summary.items()
             if k not in keys and isinstance(v, (int, float, str)) and not isinstance(v, bool)
             and not (isinstance(v, str) and ("/" in v or len(v) > 24))]
    return ", ".join(f"{k}={_short(summary[k])}" for k in keys[:limit])


def stale_upstream(marker: dict[str, Any], by_stage: dict[str, dict[str, Any]]) -> list[str]:
    """The upstream stages whose marker changed since `marker`'s stage ran (r2v.pipeline's own test)."""
    try:
        from r2v.pipeline import marker_digest
    except ImportError:  # the bench still reads markers without the package
        return []
    return [up for up, digest in (marker.get("upstream") or {}).items() if digest != marker_digest(by_stage.get(up))]


def stage_order() -> list[str]:
    try:
        from r2v.pipeline import STAGE_NAMES

        return list(STAGE_NAMES)
    except Exception:  # noqa: BLE001 - the bench still reads markers without the package
        return list(HEADLINE)


def read_markers(stages_dir: Path) -> list[dict[str, Any]]:
    order = stage_order()
    markers = []
    for p in stages_dir.glob("*.json"):
        try:
            m = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            markers.append({"stage": p.stem, "error": f"unreadable marker {p}: {e}"})
            continue
        m.setdefault("stage", p.stem)
        markers.append(m)
    rank = {name: i for i, name in enumerate(order)}
    return sorted(markers, key=lambda m: (rank.get(m["stage"], len(rank)), m.get("finished_at", "")))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exp", default="quickstart", help="experiment name (runs/<exp>/)")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--out", default="runs/bench/quickstart_stages.json")
    args = ap.parse_args(argv)

    exp_dir = Path(args.runs_dir) / args.exp
    stages_dir = exp_dir / ".stages"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    markers = read_markers(stages_dir) if stages_dir.is_dir() else []
    if not markers:
        note = f"no finished stages under {stages_dir}: run the quickstart first: {HOW_TO}"
        print(note)  # no JSON written: the last good one (if any) stays for bench.all and docs/results.md
        return {"status": "missing", "experiment": args.exp, "note": note}

    order = stage_order()
    done = {m["stage"] for m in markers}
    rows = []
    for m in markers:
        rows.append({"stage": m["stage"], "wall_s": round(float(m.get("wall_s") or 0.0), 2),
                     "finished_at": m.get("finished_at", ""), "headline": headline(m["stage"], m.get("summary", {})),
                     **({"error": m["error"]} if "error" in m else {})})
    latest = ""
    by_stage = {m["stage"]: m for m in markers}
    for r, m in zip(rows, markers):
        # a marker older than an earlier stage's: left from a previous run, not re-run since; it is *stale* only if
        # an upstream stage's marker no longer matches the digest it recorded (what `r2v run` re-runs on): an
        # upstream re-run with the same products (e.g. `r2v tasks` again) leaves it up to date
        r["older_than_upstream"] = bool(r["finished_at"] and latest and r["finished_at"] < latest)
        r["stale_upstream"] = stale_upstream(m, by_stage)
        latest = max(latest, r["finished_at"])
    total = sum(r["wall_s"] for r in rows)
    missing = [s for s in order if s not in done]
    finished = [r["finished_at"] for r in rows if r["finished_at"]]
    result = {"status": "ok", "experiment": args.exp, "stages_dir": str(stages_dir), "rows": rows,
              "total_wall_s": round(total, 2), "missing_stages": missing,
              "first_finished_at": min(finished, default=""), "last_finished_at": max(finished, default=""),
              "markers": {m["stage"]: m for m in markers}}

    print(f"\nQuickstart stage times ({stages_dir})")
    print(f"{'stage':<16}{'wall s':>9}{'share':>8}  {'finished at':<20} summary")
    for r in rows:
        share = r["wall_s"] / total if total else 0.0
        flag = "!" if r["stale_upstream"] else "*" if r["older_than_upstream"] else " "
        print(f"{r['stage']:<16}{r['wall_s']:>9.1f}{share:>8.0%}  {r['finished_at']:<19}{flag} {r.get('error') or r['headline']}")
    print(f"{'total':<16}{total:>9.1f}")
    if any(r["older_than_upstream"] and not r["stale_upstream"] for r in rows):
        print("* finished before an upstream stage re-ran with the same products: from an earlier run, up to date")
    if any(r["stale_upstream"] for r in rows):
        print("! stale: an upstream stage changed since it ran (`r2v run` re-runs it)")
    if missing:
        print(f"not finished (no marker): {', '.join(missing)}  -> {HOW_TO}")
    return write_result(out, result, default=str)


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:]).get("status") == "ok" else MISSING_INPUT)
