import os
def test_chunks():
    assert sorted(os.listdir("/app/chunks")) == ["part_aa", "part_ab", "part_ac"]
    sizes = [len(open(f"/app/chunks/{p}").read().splitlines()) for p in ["part_aa", "part_ab", "part_ac"]]
    assert sizes == [100, 100, 50]
    assert open("/app/chunks/part_ac").read().splitlines()[-1] == "line 250"


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
