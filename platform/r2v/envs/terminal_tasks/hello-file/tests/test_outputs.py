def test_hello():
    assert open("/app/hello.txt").read().strip() == "Hello, world!"


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
