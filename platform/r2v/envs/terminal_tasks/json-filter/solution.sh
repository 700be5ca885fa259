#!/bin/bash
# Oracle: one command per line (each line is one env step, run in /app).
# `# r2v: may-fail` marks a diagnostic step expected to fail (the oracle does not retry it).
python3 -c "import json; u = json.load(open('users.json')); print('\n'.join(sorted(x['name'] for x in u if x['age'] >= 18)))" > adults.txt
