import subprocess
def git(*args):
    return subprocess.run(["git", "-C", "/app/repo", *args], capture_output=True, text=True, check=True).stdout
def test_merged():
    assert git("rev-parse", "--abbrev-ref", "HEAD").strip() == "main"
    assert git("show", "main:feature.txt").strip() == "feature done"
    assert git("rev-parse", "feature") and git("merge-base", "--is-ancestor", "feature", "main") == ""
    assert git("status", "--porcelain").strip() == ""


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")
