import subprocess
def test_report():
    assert subprocess.run(["bash", "-n", "/app/report.sh"]).returncode == 0
    assert open("/app/report.txt").read().strip() == "total: 1179"


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
