def test_count():
    assert int(open("/app/count.txt").read().strip()) == 137


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
