import subprocess
from pathlib import Path

SERVICE = Path("/app/service")


def git(*args):
    return subprocess.run(["git", *args], cwd=SERVICE, capture_output=True, text=True, check=True).stdout


def test_port_restored():
    assert "PORT = 8080" in (SERVICE / "config.py").read_text()


def test_other_settings_kept():
    text = (SERVICE / "config.py").read_text()
    assert 'HOST = "0.0.0.0"' in text and "WORKERS = 4" in text


def test_history_not_rewritten():
    subjects = git("log", "--format=%s").splitlines()
    assert "tune settings" in subjects and "service v1" in subjects


def test_app_runs():
    out = subprocess.run(["python3", "app.py"], cwd=SERVICE, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "listening on 0.0.0.0:8080"
