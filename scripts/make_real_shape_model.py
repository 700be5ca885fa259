#!/usr/bin/env python
"""Write a randomly initialised Qwen2 model of real shape (151,936-token vocabulary, chat template) to an
HF directory, built locally with no download: `python scripts/make_real_shape_model.py OUT [--preset tiny|0.5b]`.
The library function is r2v.policies.real_shape.make_real_shape_model."""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from r2v.policies.real_shape import PRESETS, make_real_shape_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", help="directory to write (created)")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--max-positions", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(make_real_shape_model(args.out, args.preset, max_positions=args.max_positions, seed=args.seed)))


if __name__ == "__main__":
    main()
