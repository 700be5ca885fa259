#!/bin/bash
cd /app/service
rev=$(git log --format=%H -n 1 -- config.py)
git checkout "$rev^" -- config.py
git commit -qm "Revert config.py to before $rev"
