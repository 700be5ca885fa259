import sys
sys.path.insert(0, "/app")
from inventory import Inventory
def test_inventory():
    inv = Inventory()
    inv.add("a", 2); inv.add("b", 7); inv.add("a", 4); inv.add("c")
    assert inv.items == {"a": 6, "b": 7, "c": 1}
    assert inv.total() == 14
    assert inv.most_stocked() == "b"
    inv.remove("b", 7)
    assert inv.most_stocked() == "a" and "b" not in inv.items
    try:
        inv.remove("c", 2)
    except ValueError:
        pass
    else:
        raise AssertionError("remove past zero must raise")


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
