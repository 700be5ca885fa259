def test_key():
    assert open("/app/answer.txt").read().strip() == "r2v-KEY-4821"


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
