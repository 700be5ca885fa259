from pathlib import Path

import pytest


@pytest.mark.parametrize("name", ["alice", "bob", "carol"])
def test_greeting(name):
    assert Path(f"/app/work/greetings/{name}.txt").read_text() == f"Hello, {name}!\n"
