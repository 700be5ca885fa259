"""A tiny inventory with three bugs."""


class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, qty=1):
        self.items[name] = qty  # BUG: should accumulate

    def remove(self, name, qty=1):
        if self.items.get(name, 0) < qty:
            raise ValueError(f"not enough {name}")
        self.items[name] -= qty
        if self.items[name] == 0:
            del self.items[name]

    def total(self):
        return len(self.items)  # BUG: should be the total quantity

    def most_stocked(self):
        return min(self.items, key=self.items.get)  # BUG: should be the largest
