#!/bin/bash
# Oracle: one command per line (each line is one env step, run in /app).
# `# r2v: may-fail` marks a diagnostic step expected to fail (the oracle does not retry it).
grep ' ERROR ' app.log | sed -E 's/.*\[([a-z]+)\].*/\1/' | sort | uniq -c | sort -k1,1nr -k2 | awk '{print $2, $1}' > errors.txt
