def test_token():
    assert open("/app/token.txt").read().strip() == "tok-93f1-second"


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
