#!/bin/bash
# Builds the initial /app state (hidden from the agent); one line per command, each run from /app.
set -e
( git init -q -b main repo )
( cd repo && echo hello > README.md && git add . && git -c user.name=r2v -c user.email=r2v@example.com commit -qm "Initial" )
( cd repo && echo tok-11aa-first > token.txt && git add . && git -c user.name=r2v -c user.email=r2v@example.com commit -qm "Add token" )
( cd repo && echo tok-93f1-second > token.txt && git add . && git -c user.name=r2v -c user.email=r2v@example.com commit -qm "Rotate token" )
( cd repo && echo more >> README.md && git add . && git -c user.name=r2v -c user.email=r2v@example.com commit -qm "Docs" )
( cd repo && git rm -q token.txt && git -c user.name=r2v -c user.email=r2v@example.com commit -qm "Remove token" )
( cd repo && echo x > other.txt && git add . && git -c user.name=r2v -c user.email=r2v@example.com commit -qm "Other" )
