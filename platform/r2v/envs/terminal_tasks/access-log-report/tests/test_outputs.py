import tarfile
def r(name):
    return open("/app/report/" + name).read().strip()
def test_files():
    assert r("ips.txt").split() == ['10.0.0.12', '10.0.0.25', '10.0.0.3', '10.0.0.31', '10.0.0.7']
    assert [l.split() for l in r("status.txt").splitlines()] == [['200', '43'], ['304', '11'], ['404', '15'], ['500', '11']]
    assert r("top_path.txt") == '/api/items'
    assert r("summary.txt") == "requests 80"
def test_archive():
    names = tarfile.open("/app/report.tar.gz", "r:gz").getnames()
    assert {"report/ips.txt", "report/status.txt", "report/top_path.txt", "report/summary.txt"} <= set(names), names


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
