"""Benchmarks (not timed tests): run each as `python -m bench.<name>`."""

# Exit status of a bench that reads a finished pipeline run (quickstart_stages, routing_quality) when that run
# does not exist: `bench.all` reports it as "missing input" rather than as a failure.
MISSING_INPUT = 3
