#!/bin/bash
# Builds the initial /app state (hidden from the agent); one line per command, each run from /app.
set -e
( mkdir -p vault/inner/deeper && echo r2v-KEY-4821 > vault/inner/deeper/key.txt && echo decoy > vault/readme.txt )
( tar -czf bundle.tar.gz vault && rm -rf vault )
