#!/bin/bash
# Oracle: one command per line (each line is one env step, run in /app).
# `# r2v: may-fail` marks a diagnostic step expected to fail (the oracle does not retry it).
sqlite3 shop.db "SELECT c.name FROM customers c JOIN orders o ON o.customer_id = c.id GROUP BY c.id ORDER BY SUM(o.amount) DESC LIMIT 1" > top.txt
