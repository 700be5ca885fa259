#!/bin/bash
# Oracle: one command per line (each line is one env step, run in /app).
# `# r2v: may-fail` marks a diagnostic step expected to fail (the oracle does not retry it).
python3 -c "import json; d = json.load(open('settings.json')); d.update(debug=False, port=9090); json.dump(d, open('settings.json', 'w'), indent=2)"
