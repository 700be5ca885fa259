#!/bin/bash
# Oracle: one command per line (each line is one env step, run in /app).
# `# r2v: may-fail` marks a diagnostic step expected to fail (the oracle does not retry it).
python3 check_inventory.py  # r2v: may-fail
sed -i 's/self.items\[name\] = qty  # BUG: should accumulate/self.items[name] = self.items.get(name, 0) + qty/' inventory.py
python3 check_inventory.py  # r2v: may-fail
sed -i 's/return len(self.items)  # BUG: should be the total quantity/return sum(self.items.values())/' inventory.py
python3 check_inventory.py  # r2v: may-fail
sed -i 's/return min(self.items, key=self.items.get)  # BUG: should be the largest/return max(self.items, key=self.items.get)/' inventory.py
python3 check_inventory.py
