#!/bin/bash
# Builds the initial /app state (hidden from the agent); one line per command, each run from /app.
set -e
( mkdir -p data/logs && head -c 1500 /dev/zero > data/logs/a.bin )
( mkdir -p data/logs && head -c 200 /dev/zero > data/logs/b.bin )
( mkdir -p data/img && head -c 4096 /dev/zero > data/img/c.bin )
( mkdir -p data/img/deep && head -c 1001 /dev/zero > data/img/deep/d.bin )
( mkdir -p data/. && head -c 1000 /dev/zero > data/e.bin )
( mkdir -p data/. && head -c 10 /dev/zero > data/f.bin )
