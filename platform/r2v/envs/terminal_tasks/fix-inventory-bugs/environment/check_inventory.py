from inventory import Inventory

inv = Inventory()
inv.add("apple", 3)
inv.add("apple", 2)
inv.add("pear")
assert inv.items == {"apple": 5, "pear": 1}, inv.items
assert inv.total() == 6, inv.total()
assert inv.most_stocked() == "apple"
inv.remove("apple", 5)
assert inv.items == {"pear": 1}
print("ok")
