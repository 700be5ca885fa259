def test_errors():
    got = [l.split() for l in open("/app/errors.txt").read().strip().splitlines()]
    assert got == [['auth', '9'], ['db', '6'], ['api', '4'], ['cache', '2']], got


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
