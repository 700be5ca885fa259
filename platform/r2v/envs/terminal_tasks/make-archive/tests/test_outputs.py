import tarfile
def test_archive():
    names = tarfile.open("/app/backup.tar.gz", "r:gz").getnames()
    assert "project/src/main.py" in names and "project/README.md" in names, names
    assert not any(n.endswith(".log") for n in names), names


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
