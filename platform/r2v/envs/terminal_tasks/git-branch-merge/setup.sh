#!/bin/bash
# Builds the initial /app state (hidden from the agent); one line per command, each run from /app.
set -e
( git init -q -b main repo )
( cd repo && echo base > base.txt && git add . && git -c user.name=r2v -c user.email=r2v@example.com commit -qm "Base" )
