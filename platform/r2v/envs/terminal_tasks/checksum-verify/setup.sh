#!/bin/bash
# Builds the initial /app state (hidden from the agent); one line per command, each run from /app.
set -e
( mkdir -p files && for i in 1 2 3 4 5 6; do echo "content $i" > files/f$i.txt; done )
( cd files && sha256sum *.txt > ../checksums.sha256 )
( echo tampered >> files/f4.txt )
