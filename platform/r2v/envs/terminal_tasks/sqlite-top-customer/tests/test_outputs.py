def test_top():
    assert open("/app/top.txt").read().strip() == 'Umbrella'


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
