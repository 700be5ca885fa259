#!/bin/bash
# Runs at `submit` with the tests mounted read-only at $TEST_DIR (/tests) and cwd /app.
# Plain python asserts (no pytest: the sandbox has no network to install it); exit 0 = pass.
set -e
python3 "$TEST_DIR/test_outputs.py"
