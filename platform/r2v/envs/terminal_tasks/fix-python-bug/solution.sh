#!/bin/bash
# Oracle: one command per line (each line is one env step, run in /app).
# `# r2v: may-fail` marks a diagnostic step expected to fail (the oracle does not retry it).
python3 check_stats.py  # r2v: may-fail
sed -i 's|(len(xs) - 1)|len(xs)|' stats.py
python3 check_stats.py
