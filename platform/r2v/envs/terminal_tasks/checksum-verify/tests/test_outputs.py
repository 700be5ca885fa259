def test_bad():
    assert open("/app/bad.txt").read().strip() == "f4.txt"


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
