#!/bin/bash
# Oracle: one command per line (each line is one env step, run in /app).
# `# r2v: may-fail` marks a diagnostic step expected to fail (the oracle does not retry it).
mkdir -p calc/calc calc/tests
printf 'def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n' > calc/calc/__init__.py
printf 'import sys\nsys.path.insert(0, sys.path[0] + "/..")\nfrom calc import add, mul\n\nassert add(2, 3) == 5\nassert mul(2, 3) == 6\nprint("ok")\n' > calc/tests/test_calc.py
echo '# calc' > calc/README.md
echo '__pycache__/' > calc/.gitignore
python3 calc/tests/test_calc.py
git -C calc init -b main
git -C calc add -A
git -c user.name=r2v -c user.email=r2v@example.com -C calc commit -m "Scaffold calc"
tar --exclude=.git -czf calc.tar.gz calc
