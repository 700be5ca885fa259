def test_freq():
    got = [l.split() for l in open("/app/freq.txt").read().strip().splitlines()]
    assert got == [['river', '9'], ['stone', '7'], ['light', '6'], ['north', '4'], ['quiet', '3']], got


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
