import subprocess, sys, tarfile
def git(*args):
    return subprocess.run(["git", "-C", "/app/calc", *args], capture_output=True, text=True, check=True).stdout
def test_package():
    sys.path.insert(0, "/app/calc")
    import calc
    assert calc.add(4, 5) == 9 and calc.mul(4, 5) == 20
    assert subprocess.run([sys.executable, "/app/calc/tests/test_calc.py"]).returncode == 0
    assert open("/app/calc/README.md").readline().strip() == "# calc"
def test_git():
    assert git("rev-parse", "--abbrev-ref", "HEAD").strip() == "main"
    assert git("status", "--porcelain").strip() == ""
    tracked = git("ls-files").split()
    assert {"calc/__init__.py", "tests/test_calc.py", "README.md", ".gitignore"} <= set(tracked), tracked
    assert not any("__pycache__" in t for t in tracked)
def test_archive():
    names = tarfile.open("/app/calc.tar.gz", "r:gz").getnames()
    assert "calc/calc/__init__.py" in names and "calc/README.md" in names, names
    assert not any(n == "calc/.git" or n.startswith("calc/.git/") for n in names), names


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
