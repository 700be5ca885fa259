import json
def test_settings():
    d = json.load(open("/app/settings.json"))
    assert d == {"name": "svc", "debug": False, "port": 9090, "tags": ["a", "b"]}, d


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
