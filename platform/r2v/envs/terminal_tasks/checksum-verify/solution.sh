#!/bin/bash
# Oracle: one command per line (each line is one env step, run in /app).
# `# r2v: may-fail` marks a diagnostic step expected to fail (the oracle does not retry it).
cd files && sha256sum -c ../checksums.sha256 2>/dev/null | grep FAILED | cut -d: -f1 > ../bad.txt
