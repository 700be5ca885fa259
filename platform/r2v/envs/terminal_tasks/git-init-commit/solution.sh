#!/bin/bash
# Oracle: one command per line (each line is one env step, run in /app).
# `# r2v: may-fail` marks a diagnostic step expected to fail (the oracle does not retry it).
git -C notes init -b main
git -C notes add notes.md
git -c user.name=r2v -c user.email=r2v@example.com -C notes commit -m "Add notes"
