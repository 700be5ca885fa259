def test_large():
    assert open("/app/large.txt").read().split() == ['img/c.bin', 'img/deep/d.bin', 'logs/a.bin']


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
