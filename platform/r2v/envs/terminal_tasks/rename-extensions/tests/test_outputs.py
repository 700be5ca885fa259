import os
def test_names():
    assert sorted(os.listdir("/app/photos")) == ["beach.jpg", "cat.jpg", "notes.txt", "sunset.png", "tree.jpg"]
    assert open("/app/photos/cat.jpg").read() == "cat"


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
