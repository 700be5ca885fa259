import subprocess
def test_greet():
    out = subprocess.run(["/app/greet"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "Hello from C"
def test_make_clean_rebuild():
    assert subprocess.run(["make", "-C", "/app", "-n"], capture_output=True).returncode == 0


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
