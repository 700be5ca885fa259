#!/bin/bash
# Oracle: one command per line (each line is one env step, run in /app).
# `# r2v: may-fail` marks a diagnostic step expected to fail (the oracle does not retry it).
tar -xzf bundle.tar.gz
find vault -name key.txt -exec cat {} \; > answer.txt
