def test_replaced():
    assert open("/app/docs/a.txt").read() == "bar and bar\n"
    assert open("/app/docs/sub/b.txt").read() == "no bar here? bar!\n"
    assert open("/app/docs/c.md").read() == "foo stays\n"


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
