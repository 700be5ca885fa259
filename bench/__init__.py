"""Benchmarks (not timed tests): run each as `python -m bench.<name>`."""

# Exit status of a bench that reads a finished pipeline run (quickstart_stages, routing_quality) when that run
# does not exist: `bench.all` reports it as "missing input" rather than as a failure.
MISSING_INPUT = 3


def write_result(out, result: dict, default=float) -> dict:
    """Write a bench's JSON result to `out` (folders made), say where, and hand the result back."""
    import json
    from pathlib import Path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=default))
    print(f"wrote {out}")
    return result
