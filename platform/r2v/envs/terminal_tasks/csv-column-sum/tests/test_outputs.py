def test_total():
    assert open("/app/total.txt").read().strip() == "5088.64"


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
