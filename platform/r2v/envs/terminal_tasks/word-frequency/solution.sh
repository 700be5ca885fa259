#!/bin/bash
# Oracle: one command per line (each line is one env step, run in /app).
# `# r2v: may-fail` marks a diagnostic step expected to fail (the oracle does not retry it).
tr -cs 'A-Za-z' '\n' < text.txt | tr 'A-Z' 'a-z' | grep -v '^$' | sort | uniq -c | sort -k1,1nr -k2 | head -5 | awk '{print $2, $1}' > freq.txt
