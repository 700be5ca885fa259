#!/bin/bash
# Oracle: one command per line (each line is one env step, run in /app).
# `# r2v: may-fail` marks a diagnostic step expected to fail (the oracle does not retry it).
git -C repo checkout -b feature
echo 'feature done' > repo/feature.txt
git -C repo add feature.txt
git -c user.name=r2v -c user.email=r2v@example.com -C repo commit -m "Add feature"
git -C repo checkout main
git -c user.name=r2v -c user.email=r2v@example.com -C repo merge --no-edit feature
