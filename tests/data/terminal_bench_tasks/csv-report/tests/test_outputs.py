import os
from pathlib import Path


def test_report_totals():
    path = Path(os.environ.get("REPORT_PATH", "/app/out/report.csv"))
    assert path.read_text().splitlines() == ["east,3", "north,17", "south,6"]
