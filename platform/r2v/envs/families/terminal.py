"""Terminal-Bench-layout task families: count/filter/sort/aggregate/rename/archive/git tasks whose files,
words, numbers and names are generated per instance.

Each instance is written as a task directory (task.yaml, environment/, solution.sh, run-tests.sh,
tests/test_outputs.py, optional setup.sh) that `TerminalEnv` loads like any Terminal-Bench task. The hidden
tests hold the expected answer as literals computed here in plain Python from the generated data (nothing
generated is executed on the host); test_outputs.py is pytest-style and also runs as a plain script, which is
what run-tests.sh does (faster than starting pytest in the sandbox). Solutions are short one-liners whose
arguments come from the instruction, so a tiny SLM trained on some instances can solve held-out ones.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from r2v.envs.families import instance_rng, pick_templates

FILES = ["data.txt", "log.txt", "input.txt", "lines.txt", "records.txt", "notes.txt"]
OUTS = ["answer.txt", "out.txt", "result.txt", "output.txt"]
WORDS = ["alpha", "beta", "gamma", "delta", "error", "warn", "info", "disk", "net", "cpu", "user", "admin",
         "apple", "pear", "plum", "kiwi", "red", "blue", "green", "cyan"]
RUN_TESTS = ("#!/bin/bash\n# Runs at `submit` with the tests mounted read-only at $TEST_DIR, cwd /app; exit 0 = pass.\n"
             "set -e\npython3 \"$TEST_DIR/test_outputs.py\"\n")


@dataclass
class Instance:
    instruction: str
    files: dict[str, str]  # environment/ (what the agent finds in /app)
    solution: list[str]  # one command per step
    checks: list[str]  # python statements for test_outputs.py (cwd /app; `Path` is imported)
    setup: str = ""  # setup.sh body (hidden from the agent), e.g. a git history
    category: str = "text"
    extra: dict = field(default_factory=dict)


def _lines(rng: random.Random, n: int, words: list[str]) -> list[str]:
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 5))) for _ in range(n)]


def _file_out(rng) -> tuple[str, str]:
    return rng.choice(FILES), rng.choice(OUTS)


def _text(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def _expect_file(out: str, content: str) -> str:
    return f"assert Path({out!r}).read_text() == {content!r}, 'wrong content in {out}'"


def _expect_number(out: str, value: int) -> str:
    return f"assert Path({out!r}).read_text().strip() == {str(value)!r}, 'wrong number in {out}'"


# ----------------------------------------------------------------------------------------- templates
def count_matching(rng):
    f, out = _file_out(rng)
    word = rng.choice(WORDS)
    lines = _lines(rng, rng.randint(5, 20), WORDS) + [f"{word} {rng.choice(WORDS)}"]  # >= 1 match: grep exits 0
    rng.shuffle(lines)
    n = sum(word in line for line in lines)
    return Instance(f"Write the number of lines of /app/{f} that contain '{word}' to /app/{out}.",
                    {f: _text(lines)}, [f"grep -c {word} {f} > {out}"], [_expect_number(out, n)])


def filter_out(rng):
    f, out = _file_out(rng)
    word = rng.choice(WORDS)
    lines = _lines(rng, rng.randint(5, 15), WORDS) + ["-"]  # >= 1 kept line: grep exits 0
    rng.shuffle(lines)
    keep = [line for line in lines if word not in line]
    return Instance(f"Write the lines of /app/{f} that do not contain '{word}' to /app/{out}, in order.",
                    {f: _text(lines)}, [f"grep -v {word} {f} > {out}"], [_expect_file(out, _text(keep))])


def sort_numbers(rng):
    f, out = _file_out(rng)
    nums = [rng.randint(-50, 500) for _ in range(rng.randint(5, 15))]
    desc = rng.random() < 0.5
    order = "descending" if desc else "ascending"
    return Instance(f"Sort the numbers in /app/{f} (one per line) in {order} numeric order into /app/{out}.",
                    {f: _text(map(str, nums))}, [f"sort -{'r' if desc else ''}n {f} > {out}"],
                    [_expect_file(out, _text(map(str, sorted(nums, reverse=desc))))])


def sum_column(rng):
    f, out = rng.choice(["sales.csv", "data.csv", "stats.csv", "table.csv"]), rng.choice(OUTS)
    cols = rng.sample(["id", "price", "qty", "score", "age", "weight"], 3)
    rows = [[rng.randint(1, 99) for _ in cols] for _ in range(rng.randint(3, 10))]
    k = rng.randint(1, 3)
    total = sum(r[k - 1] for r in rows)
    csv = _text([",".join(cols)] + [",".join(map(str, r)) for r in rows])
    return Instance(f"/app/{f} is a CSV file with a header row. Write the sum of its '{cols[k - 1]}' column "
                    f"(column {k}) to /app/{out}.", {f: csv},
                    [f"awk -F, 'NR>1 {{s+=${k}}} END {{print s}}' {f} > {out}"], [_expect_number(out, total)],
                    category="data")


def head_lines(rng):
    f, out = _file_out(rng)
    lines = _lines(rng, rng.randint(8, 20), WORDS)
    n = rng.randint(2, 7)
    return Instance(f"Write the first {n} lines of /app/{f} to /app/{out}.", {f: _text(lines)},
                    [f"head -n {n} {f} > {out}"], [_expect_file(out, _text(lines[:n]))])


def count_unique(rng):
    f, out = _file_out(rng)
    pool = rng.sample(WORDS, rng.randint(3, 8))
    lines = [rng.choice(pool) for _ in range(rng.randint(8, 20))]
    return Instance(f"Write the number of distinct lines in /app/{f} to /app/{out}.", {f: _text(lines)},
                    [f"sort -u {f} | wc -l > {out}"], [_expect_number(out, len(set(lines)))])


def max_value(rng):
    f, out = _file_out(rng)
    nums = [rng.randint(-100, 900) for _ in range(rng.randint(5, 15))]
    big = rng.random() < 0.5
    which = "largest" if big else "smallest"
    return Instance(f"Write the {which} number in /app/{f} (one number per line) to /app/{out}.",
                    {f: _text(map(str, nums))}, [f"sort -n {f} | {'tail' if big else 'head'} -n 1 > {out}"],
                    [_expect_number(out, max(nums) if big else min(nums))], category="data")


def replace_word(rng):
    f = rng.choice(FILES)
    old, new = rng.sample(WORDS, 2)
    lines = _lines(rng, rng.randint(4, 12), WORDS) + [f"{old} {rng.choice(WORDS)}"]
    rng.shuffle(lines)
    fixed = [line.replace(old, new) for line in lines]  # as sed does
    return Instance(f"Replace every occurrence of the word '{old}' with '{new}' in /app/{f}, in place.",
                    {f: _text(lines)}, [f"sed -i 's/{old}/{new}/g' {f}"], [_expect_file(f, _text(fixed))])


def count_files(rng):
    d, ext = rng.choice(["docs", "src", "files", "inbox"]), rng.choice(["txt", "md", "py", "csv"])
    out = rng.choice(OUTS)
    others = [e for e in ("log", "json", "cfg", "dat") if e != ext]
    names = rng.sample([f"{w}{i}" for w in WORDS for i in range(3)], rng.randint(4, 14))
    files = {f"{d}/{n}.{ext if i == 0 or rng.random() < 0.5 else rng.choice(others)}": "x\n"
             for i, n in enumerate(names)}  # >= 1 match: grep exits 0
    n = sum(p.endswith("." + ext) for p in files)
    return Instance(f"Write the number of .{ext} files in /app/{d} to /app/{out}.", files,
                    [f"ls {d} | grep -c '\\.{ext}$' > {out}"], [_expect_number(out, n)], category="files")


def rename_ext(rng):
    d = rng.choice(["docs", "src", "files", "inbox"])
    a, b = rng.sample(["txt", "md", "log", "bak", "old", "dat"], 2)
    names = rng.sample([f"{w}{i}" for w in WORDS for i in range(3)], rng.randint(2, 6))
    files = {f"{d}/{n}.{a}": f"{n}\n" for n in names}
    files[f"{d}/keep.json"] = "{}\n"
    expected = sorted([f"{n}.{b}" for n in names] + ["keep.json"])
    return Instance(f"Rename every .{a} file in /app/{d} so it ends in .{b} instead (keep the rest of the name).",
                    files, [f"for f in {d}/*.{a}; do mv \"$f\" \"${{f%.{a}}}.{b}\"; done"],
                    [f"assert sorted(p.name for p in Path({d!r}).iterdir()) == {expected!r}"], category="files")


def make_archive(rng):
    d, name = rng.choice(["project", "site", "assets", "report"]), rng.choice(["backup", "bundle", "archive", "snap"])
    names = rng.sample(WORDS, rng.randint(2, 4))
    files = {f"{d}/{n}.txt": f"{rng.choice(WORDS)}\n" for n in names}
    members = sorted([d] + list(files))
    check = ("import tarfile\n"
             f"with tarfile.open({name + '.tar.gz'!r}, 'r:gz') as t:\n"
             f"    names = sorted(m.name.rstrip('/').removeprefix('./') for m in t.getmembers())\n"
             f"assert names == {members!r}, names")
    return Instance(f"Create a gzip-compressed tar archive /app/{name}.tar.gz of the directory {d} (paths inside "
                    f"start with {d}/).", files, [f"tar -czf {name}.tar.gz {d}"], [check], category="files")


def git_commit(rng):
    repo, f = rng.choice(["repo", "proj", "app", "work"]), rng.choice(["notes.md", "todo.txt", "main.py", "README"])
    msg = f"{rng.choice(['Add', 'Update', 'Fix'])} {rng.choice(WORDS)}"
    content = f"{rng.choice(WORDS)} {rng.choice(WORDS)}\n"
    setup = (f"set -e\ncd /app\ngit init -q -b main {repo}\ngit -C {repo} config user.name r2v\n"
             f"git -C {repo} config user.email r2v@example.com\necho init > {repo}/.keep\n"
             f"git -C {repo} add .keep\ngit -C {repo} commit -qm init\n")
    check = ("import subprocess\n"
             f"log = subprocess.run(['git', '-C', {repo!r}, 'log', '-1', '--format=%s'], capture_output=True, "
             "text=True).stdout.strip()\n"
             f"assert log == {msg!r}, log\n"
             f"shown = subprocess.run(['git', '-C', {repo!r}, 'show', 'HEAD:{f}'], capture_output=True, "
             "text=True).stdout\n"
             f"assert shown == {content!r}, shown")
    return Instance(f"In the git repository /app/{repo}, create {f} containing the line '{content.strip()}' and "
                    f"commit it with the message '{msg}'.", {},
                    [f"echo '{content.strip()}' > {repo}/{f}", f"git -C {repo} add {f}",
                     f"git -C {repo} commit -qm '{msg}'"], [check], setup=setup, category="git")


TEMPLATES = {f.__name__: f for f in (count_matching, filter_out, sort_numbers, sum_column, head_lines, count_unique,
                                       max_value, replace_word, count_files, rename_ext, make_archive, git_commit)}


# ----------------------------------------------------------------------------------------- writing
def _test_file(checks: list[str]) -> str:
    body = "".join("    " + line + "\n" for check in checks for line in check.splitlines())
    return ("# Hidden tests (pytest-style; also runs as a plain script). cwd: /app\nimport os\n"
            "from pathlib import Path\n\nos.chdir('/app')\n\n\ndef test_outputs():\n" + body +
            "\n\nif __name__ == '__main__':\n    test_outputs()\n    print('ok')\n")


def write_task(inst: Instance, task_dir: Path) -> None:
    """One Terminal-Bench-layout task directory."""
    (task_dir / "tests").mkdir(parents=True)
    meta = {"instruction": inst.instruction, "difficulty": "easy", "category": inst.category,
            "max_test_timeout_sec": 30, "author": "r2v-procedural"}
    (task_dir / "task.yaml").write_text(yaml.safe_dump(meta, sort_keys=False, width=1000))
    env_dir = task_dir / "environment"
    env_dir.mkdir()
    for rel, content in inst.files.items():
        (env_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (env_dir / rel).write_text(content)
    (task_dir / "solution.sh").write_text("#!/bin/bash\n# Oracle: one command per line.\n"
                                          + "".join(c + "\n" for c in inst.solution))
    (task_dir / "run-tests.sh").write_text(RUN_TESTS)
    (task_dir / "tests" / "test_outputs.py").write_text(_test_file(inst.checks))
    if inst.setup:
        (task_dir / "setup.sh").write_text("#!/bin/bash\n" + inst.setup)


def generate(root: Path, seed: int, instances: int, templates: list[str] | None = None) -> Path:
    """Write `instances` task dirs per template (`<template>-<index>`) under
    root/seed<S>-n<N>-<templates>-<generator hash> once; later calls (other stages, Ray workers) reuse it. Written to a temp dir and renamed into place,
    so a reader never sees half a set."""
    names = pick_templates(TEMPLATES, templates, "env.terminal.procedural.templates")
    tag = "all" if not templates else "-".join(names)
    version = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8]  # an edited generator: a fresh set
    out = Path(root).expanduser() / f"seed{seed}-n{instances}-{tag}-{version}"
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        for name in names:
            for i in range(instances):
                write_task(TEMPLATES[name](instance_rng("terminal", seed, name, i)), tmp / f"{name}-{i:03d}")
        os.chmod(tmp, 0o755)
        try:
            tmp.rename(out)
        except OSError:  # another process got there first: theirs is identical
            if not out.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
