#!/bin/bash
source $HOME/.local/bin/env 2>/dev/null || true
uvx pytest==8.4.1 $TEST_DIR/test_outputs.py -rA
