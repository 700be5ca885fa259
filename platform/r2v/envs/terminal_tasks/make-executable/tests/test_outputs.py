import os
def test_exec():
    assert os.access("/app/run.sh", os.X_OK)
    assert open("/app/output.txt").read().strip() == "ran ok"


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
