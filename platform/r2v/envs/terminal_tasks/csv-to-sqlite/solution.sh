#!/bin/bash
# Oracle: one command per line (each line is one env step, run in /app).
# `# r2v: may-fail` marks a diagnostic step expected to fail (the oracle does not retry it).
sqlite3 people.db "CREATE TABLE IF NOT EXISTS people(name TEXT, age INTEGER, city TEXT)"
sqlite3 people.db "DELETE FROM people"
sqlite3 -csv people.db ".import --skip 1 people.csv people"
sqlite3 people.db "SELECT COUNT(*), typeof(age) FROM people"
