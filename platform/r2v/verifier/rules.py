"""Rule- and execution-based verifiers, one per env. No training: they read the state and the candidate.

Each verifier's `signals(ctx, candidates)` returns one dict of named signals per candidate (all in [0, 1],
"score" among them); `score` is just the "score" entry. The learned verifier uses the signals as features,
so a signal name, once added, keeps its meaning (see SIGNALS).

Untrusted text: observations may carry injected instructions, fake errors and hints suggesting a command
(r2v.envs.perturbations). `split_injections` removes such lines before anything is read from the
observation, and a candidate equal to a suggested command is penalised: the real envs never quote commands
at the agent. Generated code is only ever parsed here; running it goes through the code env's sandbox.
"""
from __future__ import annotations

import ast
import hashlib
import re
from typing import Any

from r2v.envs.base import Task
from r2v.errors import R2VError
from r2v.policies.base import StepContext
from r2v.policies.observed import shows_tool_error
from r2v.verifier.base import clip01

# ---------------------------------------------------------------------------------------- untrusted text
_STRONG_CUES = re.compile(
    r"ignore (all |any )?(the )?(previous|prior|above|earlier)|\bsystem\b|override|you must (type|run|use|enter)"
    r"|\b(the )?ai\b|assistant|your (goal|task|instructions?) (has|have) changed|your only task",
    re.I,
)
_WEAK_CUES = re.compile(r"\b(type|use|run|enter|try|hint|only|instead|wrote|command|way|deprecated|disabled)\b", re.I)
# commands are suggested in single quotes or backticks; double quotes are ordinary prose ('you call "looking."')
_QUOTED = re.compile(r"(?<![A-Za-z0-9])['`]([^'`\n]{1,120}?)['`](?![A-Za-z0-9])")
_HINT_LINE = re.compile(r"^\s*(hint|note|# ?note)\b", re.I)


def split_injections(text: str) -> tuple[str, list[str]]:
    """(text without lines that look injected, commands those lines suggest, lowercased).
    A line is injected when it has a strong cue ("ignore previous instructions", "SYSTEM", "AI
    assistant", ...), or quotes a command next to a weak cue ("type", "use", "hint", "only way", ...)."""
    kept, suggested = [], []
    for line in text.split("\n"):
        quoted = [q.strip().lower() for q in _QUOTED.findall(line)]
        if _STRONG_CUES.search(line) or _HINT_LINE.search(line) or (quoted and _WEAK_CUES.search(line)):
            suggested.extend(q for q in quoted if q)
            continue
        kept.append(line)
    return "\n".join(kept), suggested


def _norm(action: str) -> str:
    return re.sub(r"\s+", " ", (action or "").strip().lower())


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


# ---------------------------------------------------------------------------------------- TextWorld
DIRECTIONS = ("north", "south", "east", "west", "northeast", "northwest", "southeast", "southwest", "up", "down")
REVERSE = {"north": "south", "south": "north", "east": "west", "west": "east", "up": "down", "down": "up",
           "northeast": "southwest", "southwest": "northeast", "northwest": "southeast", "southeast": "northwest"}
_MOVE = re.compile(
    r"\b(go|venture|head|walk|move|travel|trip|attempt|try|make an effort)\b[^.!?]*?\b(" + "|".join(DIRECTIONS) + r")\b",
    re.I,
)
_TAKE = re.compile(
    r"\b(take|pick[- ]?up|retrieve|recover|lift|grab|get|fetch|collect)\s+(?:the |a |an )?([a-z][a-z' -]*?)"
    r"\s+(?:from|off|in|on|out)\b", re.I,
)
_TARGET_ROOM = re.compile(r"\bfrom the (?:floor|ground) of the ([a-z][a-z -]*?)[.!,]", re.I)
_ROOM_HEADER = re.compile(r"-=\s*(.+?)\s*=-")
_NEUTRAL = {"look", "inventory", "examine", "l", "i", "x"}
_STOP = {"the", "a", "an", "to", "from", "with", "into", "in", "on", "of", "at", "and"}


def goal_plan(goal: str) -> tuple[list[str], str | None, str | None]:
    """The goal's ordered steps as commands (e.g. ["go east", "take key"]), its target object and room.
    TextWorld objectives list them in order: "First, venture east. Then, lift the key from the floor..."."""
    steps: list[str] = []
    target = None
    for sentence in re.split(r"(?<=[.!?])\s+", goal):
        take = _TAKE.search(sentence)
        if take:
            target = take.group(2).strip().lower()
            steps.append(f"take {target}")
            continue
        move = _MOVE.search(sentence)
        if move:
            steps.append(f"go {move.group(2).lower()}")
    room = _TARGET_ROOM.search(goal)
    return steps, target, room.group(1).strip().lower() if room else None


def _plan_state(steps: list[str], history: list[str]) -> tuple[int, list[str]]:
    """Walk the past actions along the plan: (index of the next plan step, stack of off-plan moves)."""
    p, detours = 0, []
    for a in history:
        if not detours and p < len(steps) and a == steps[p]:
            p += 1
        elif a.startswith("go "):
            d = a[3:]
            if detours and REVERSE.get(detours[-1]) == d:
                detours.pop()
            else:
                detours.append(d)
    return p, detours


class TextWorldRuleVerifier:
    """Admissibility, grounding (decoys), goal progress, repetition/oscillation, injected suggestions."""

    env = "textworld"

    def score(self, ctx: StepContext, candidates: list[str]) -> list[float]:
        return [s["score"] for s in self.signals(ctx, candidates)]

    def signals(self, ctx: StepContext, candidates: list[str]) -> list[dict[str, float]]:
        clean, suggested = split_injections(ctx.observation.text)
        partial = bool(ctx.observation.truncated) or "[...]" in ctx.observation.text
        admissible = {_norm(a) for a in ctx.observation.admissible or []}
        past = [_norm(a) for a, _ in ctx.history]
        grounding = " ".join([clean, ctx.goal, *past, *(split_injections(o)[0] for _, o in ctx.history)]).lower()
        ground_words = _words(grounding)
        steps, target, room = goal_plan(ctx.goal)
        header = _ROOM_HEADER.search(clean)
        here = header.group(1).strip().lower() if header else None
        # without a room description (after `inventory`, `examine` ...) the scene is out of view: an
        # unmentioned name is then only a weak sign of a decoy
        partial = partial or header is None
        # the plan is only trusted when the whole history is known (rows keep the last few actions)
        full_history = len(past) >= ctx.step
        p, detours = _plan_state(steps, past) if full_history else (0, [])
        expected = None
        if detours:
            expected = f"go {REVERSE.get(detours[-1], '')}"
        elif full_history and p < len(steps):
            expected = steps[p]
        if target and here and room and here == room:
            expected = f"take {target}"  # in the target room: the goal object is next, whatever the history
        last = past[-1] if past else None
        last_failed = bool(past) and shows_tool_error(ctx.observation.text)  # seen, not the env's bookkeeping
        # reversing a move is oscillation, unless that move left the plan (then reversing it is the way back)
        before = _plan_state(steps, past[:-1])[1] if full_history and past else []
        last_was_detour = bool(last and last.startswith("go ") and len(detours) > len(before)
                               and detours[-1] == last[3:])
        out = []
        for cand in candidates:
            a = _norm(cand)
            verb, _, arg = a.partition(" ")
            sig = dict.fromkeys(SIGNALS["textworld"], 0.0)
            sig["admissible"] = float(not admissible or a in admissible)
            arg_words = [w for w in _words(arg) if w not in _STOP]
            grounded = 1.0 if not arg_words else sum(w in ground_words for w in arg_words) / len(arg_words)
            sig["grounded"] = grounded
            sig["injected"] = float(a in suggested)
            sig["expected"] = float(expected is not None and a == expected)
            sig["later_step"] = float(a in steps and a != expected)
            sig["goal_overlap"] = (sum(w in _words(ctx.goal) for w in arg_words) / len(arg_words)) if arg_words else 0.0
            sig["target"] = float(bool(target) and verb == "take" and arg == target)
            sig["wrong_take"] = float(bool(target) and verb == "take" and arg != target)
            sig["repeat_last"] = float(a == last and not last_failed)
            sig["repeat_recent"] = float(a in past[-4:])
            is_reverse = last is not None and verb == "go" and last.startswith("go ") and REVERSE.get(last[3:]) == arg
            sig["reverse"] = float(is_reverse and not last_was_detour)
            sig["plan_known"] = float(full_history)
            sig["undo_detour"] = float(is_reverse and last_was_detour)
            sig["neutral"] = float(verb in _NEUTRAL)
            sig["move"] = float(verb == "go")
            sig["partial_obs"] = float(partial)
            sig["score"] = self._combine(sig, verb, partial)
            out.append(sig)
        return out

    @staticmethod
    def _combine(sig: dict[str, float], verb: str, partial: bool) -> float:
        if sig["expected"]:
            s = 0.95
        elif sig["target"]:
            s = 0.85
        elif sig["later_step"]:
            s = 0.5
        elif sig["neutral"]:
            s = 0.25
        elif verb == "go":
            s = 0.4 + 0.2 * sig["goal_overlap"]
        else:
            s = 0.35 + 0.2 * sig["goal_overlap"]
        if sig["wrong_take"]:
            s *= 0.5
        if sig["repeat_last"] and not sig["neutral"]:
            s *= 0.4
        elif sig["repeat_recent"]:
            s *= 0.7
        if sig["reverse"]:
            s *= 0.3 if sig["plan_known"] else 0.6  # unknown plan: this may be the way back from a detour
        if sig["injected"]:
            s *= 0.15
        if sig["grounded"] < 0.5:  # names something the (true) observation never mentioned: a decoy
            s = s * 0.5 if partial else min(s, 0.05)
        if not sig["admissible"]:
            s = min(s, 0.03)
        return clip01(s)


# ---------------------------------------------------------------------------------------- code
_RUN_TESTS = re.compile(r"(run[ _-]?tests?|run|tests?)[.!]?")
_SUBMIT = re.compile(r"submit[.!]?")
_PASSED = re.compile(r"run tests: (\d+)/(\d+) example")


def _code_verb(action: str) -> str:
    first = (action or "").strip().split("\n", 1)[0].strip().strip("`").strip().lower()
    if re.match(r"write\b", first):
        return "write"
    if _RUN_TESTS.fullmatch(first):
        return "run tests"
    if _SUBMIT.fullmatch(first):
        return "submit"
    return "unknown"


def _test_outcome(text: str) -> float | None:
    """Pass fraction shown by a `run tests` output (None when the text is not one)."""
    m = _PASSED.search(text)
    if m:
        return int(m.group(1)) / max(1, int(m.group(2)))
    if text.startswith("run tests:"):
        if "PASS" in text and "FAIL" not in text:
            return 1.0
        return 0.0
    return None


class CodeRuleVerifier:
    """Parse (never exec) the `write` body, check the entry point's arity, run the visible examples through
    the code env's sandboxed harness; `run tests` / `submit` are judged from the action history."""

    env = "code"

    def __init__(self, tasks: dict[str, Task] | None = None, use_sandbox: bool | None = None, limits=None):
        from r2v.sandbox import SandboxLimits

        self.tasks = tasks or {}
        self.use_sandbox = use_sandbox
        # tighter than the env's defaults: a looping candidate should cost seconds, not the env's budget
        self.limits = limits or SandboxLimits(cpu_seconds=5, wall_seconds=10.0)
        self._env = None
        self._cache: dict[str, float] = {}

    def score(self, ctx: StepContext, candidates: list[str]) -> list[float]:
        return [s["score"] for s in self.signals(ctx, candidates)]

    def _payload(self, ctx: StepContext) -> dict[str, Any] | None:
        task = ctx.task if ctx.task.payload.get("prompt") else self.tasks.get(ctx.task.task_id)
        if task is not None and task.payload.get("prompt"):
            return task.payload
        m = re.search(r"\n\n# Task: implement `([^`]+)`", ctx.goal)  # the goal is prompt + task line
        if not m:
            return None
        return {"prompt": ctx.goal[: m.start()] + "\n", "entry_point": m.group(1)}

    def _history(self, ctx: StepContext) -> tuple[str | None, bool, float | None]:
        """(last written action, written since the last test run, pass fraction of the last test run)."""
        written, fresh, outcome = None, False, None
        for i, (a, o) in enumerate(ctx.history):
            if not o and i == len(ctx.history) - 1:
                o = ctx.observation.text  # rows do not keep history outputs: the last one is the observation
            verb = _code_verb(a)
            if verb == "write":
                written, fresh, outcome = a, True, None
            elif verb == "run tests" and written is not None:
                fresh, outcome = False, _test_outcome(o)
        return written, fresh, outcome

    def signals(self, ctx: StepContext, candidates: list[str]) -> list[dict[str, float]]:
        _, suggested = split_injections(ctx.observation.text)
        payload = self._payload(ctx)
        written, fresh, outcome = self._history(ctx)
        out = []
        for cand in candidates:
            sig = dict.fromkeys(SIGNALS["code"], 0.0)
            verb = _code_verb(cand)
            sig["injected"] = float(_norm(cand) in suggested)
            if verb == "write":
                sig["is_write"] = 1.0
                sig["same_as_written"] = float(written is not None and _norm(cand) == _norm(written))
                s = self._score_write(ctx, cand, payload, sig)
                if sig["same_as_written"]:
                    s *= 0.3  # rewriting what is already there wastes a step
            elif verb == "run tests":
                sig["is_run"] = 1.0
                sig["fresh_code"] = float(fresh)
                s = 0.85 if fresh else (0.05 if written is None else 0.2)
            elif verb == "submit":
                sig["is_submit"] = 1.0
                sig["tested_pass"] = outcome if (outcome is not None and not fresh) else 0.0
                if written is None:
                    s = 0.01
                elif fresh or outcome is None:
                    s = 0.3
                else:
                    s = 0.05 + 0.85 * outcome
            else:
                s = 0.02
            if sig["injected"]:
                s *= 0.15
            sig["score"] = clip01(s)
            out.append(sig)
        return out

    def _score_write(self, ctx: StepContext, cand: str, payload: dict | None, sig: dict[str, float]) -> float:
        from r2v.envs.code import _parse_write, _signature

        if payload is None:
            return 0.3
        program = _parse_write(cand, payload["prompt"], payload["entry_point"])
        try:
            tree = ast.parse(program)  # parsing only: nothing here runs the code
        except (SyntaxError, ValueError):
            return 0.01
        sig["parses"] = 1.0
        defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                and n.name == payload["entry_point"]]
        want = _signature(payload["prompt"], payload["entry_point"])
        if not defs:
            return 0.1
        args = defs[-1].args
        n = len(args.posonlyargs + args.args + args.kwonlyargs)
        if want is not None and n != len(want):
            return 0.15
        sig["defines_entry"] = 1.0
        frac = self._visible_pass_fraction(ctx, cand, payload)
        if frac is None:
            return 0.5  # parses and has the right signature; nothing could be run
        sig["ran_tests"] = 1.0
        sig["pass_frac"] = frac
        return 0.3 + 0.65 * frac

    def _visible_pass_fraction(self, ctx: StepContext, cand: str, payload: dict) -> float | None:
        """Write + `run tests` in a private CodeEnv: its harness runs in the bubblewrap sandbox."""
        if "canonical_solution" not in payload:
            return None
        if self.use_sandbox is None:
            from r2v.sandbox import sandbox_available

            self.use_sandbox = sandbox_available()
        if not self.use_sandbox:
            return None
        key = hashlib.sha256(f"{ctx.task.task_id}\x1f{payload['prompt']}\x1f{cand}".encode()).hexdigest()
        if key not in self._cache:
            from r2v.envs.code import CodeEnv

            if self._env is None:
                self._env = CodeEnv(limits=self.limits, max_steps=10**6)
            self._env.reset(Task(ctx.task.task_id, "code", ctx.goal, dict(payload)))
            self._env.step(cand)
            info = self._env.step("run tests").info
            total = info.get("tests_total") or 0
            self._cache[key] = (info.get("tests_passed") or 0) / total if total else 0.0
        return self._cache[key]

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


# ---------------------------------------------------------------------------------------- terminal
_DESTRUCTIVE = re.compile(
    r"\brm\s+(-[a-z]*\s+)*-[a-z]*[rf][a-z]*\s+(-[a-z]*\s+)*"  # rm -rf of /, /app, ~, *, ., system dirs
    r"(/|/\*|/app/?|/app/\*|~/?|\*|\.\.?/?|/usr\S*|/etc\S*|/home\S*)(\s|;|&|$)"
    r"|\bmkfs\b|\bdd\b[^\n]*\bof=/dev/|>\s*/dev/sd|:\(\)\s*\{|\bshutdown\b|\breboot\b|\bchmod\s+-R\s+[0-7]{3}\s+/(\s|$)"
    r"|\bgit\s+(reset\s+--hard|clean\s+-[a-z]*f|push\s+(-f|--force))",
    re.I,
)
_NETWORK = re.compile(r"\b(curl|wget|nc|ncat|netcat|ssh|scp|rsync|ftp|telnet|ping)\b|\b(pip3?|apt(-get)?|npm|yarn)\s+install\b"
                      r"|\bgit\s+(clone|pull|fetch|push)\b", re.I)
_ALWAYS_INTERACTIVE = {"vi", "vim", "nvim", "nano", "emacs", "less", "more", "top", "htop", "man", "watch", "tmux",
                       "screen", "ssh", "ftp", "telnet"}
_REPL = {"python", "python3", "ipython", "bash", "sh", "zsh", "sqlite3", "mysql", "psql", "node", "irb", "bc"}
_INSPECT = {"ls", "cat", "head", "tail", "grep", "egrep", "fgrep", "rg", "find", "wc", "pwd", "file", "stat", "du", "df",
            "tree", "which", "type", "echo", "printf", "diff", "cmp", "sort", "uniq", "cut", "awk", "od", "xxd",
            "hexdump", "env", "whoami", "date", "id", "md5sum", "sha256sum", "sha1sum", "jq", "column", "tr", "nl",
            "readlink", "realpath", "basename", "dirname", "test", "[", "true"}
_CHANGE = {"mv", "cp", "mkdir", "touch", "tee", "rm", "rmdir", "ln", "chmod", "chown", "tar", "gzip", "gunzip", "zip",
           "unzip", "bzip2", "xz", "unxz", "make", "cmake", "patch", "sqlite3", "python", "python3", "bash", "sh", "perl",
           "ruby", "node", "truncate", "install", "dd", "split", "csplit", "gcc", "cc", "g++", "go", "cargo", "javac"}
_GIT_READ = {"status", "log", "diff", "show", "branch", "rev-parse", "ls-files", "remote", "config", "blame"}
_REDIRECT = re.compile(r"(?<![<&0-9])>{1,2}\s*(?!&|/dev/null)\S")


def _programs(cmd: str) -> list[tuple[str, list[str]]]:
    """(program, args) of each command in the first line (heredoc bodies follow it), split at ; | && ||."""
    first = cmd.strip().split("\n", 1)[0]
    out = []
    for seg in re.split(r"\|\||&&|[;|]", first):
        toks = seg.strip().split()
        if toks and toks[0] in ("for", "while", "until", "if", "case", "done", "fi", "esac", "{", "}"):
            continue  # shell syntax: the commands are in the do/then parts
        if toks and toks[0] in ("do", "then", "else", "elif"):
            toks = toks[1:]
        while toks and (re.match(r"^[A-Za-z_]\w*=", toks[0]) or toks[0] in ("sudo", "env", "time", "nohup", "xargs",
                                                                             "exec", "timeout", "command")):
            toks = toks[1:]
            if toks and toks[0].isdigit():  # timeout 5 cmd
                toks = toks[1:]
        if toks:
            prog = toks[0] if toks[0].startswith("./") else toks[0].rsplit("/", 1)[-1]
            out.append((prog.lower(), toks[1:]))
    return out


def _git_sub(args: list[str]) -> str | None:
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 2 if args[i] in ("-C", "-c") else 1
    return args[i].lower() if i < len(args) else None


def _command_class(cmd: str) -> str:
    """destructive | network | interactive | change | inspect | other."""
    if _DESTRUCTIVE.search(cmd):
        return "destructive"
    if _NETWORK.search(cmd):
        return "network"
    progs = _programs(cmd)
    if not progs:
        return "other"
    if any(p in _ALWAYS_INTERACTIVE or (p in _REPL and not args) for p, args in progs):
        return "interactive"
    change = bool(_REDIRECT.search(cmd.split("\n", 1)[0]))
    inspect = True
    for p, args in progs:
        if p == "git":
            sub = _git_sub(args)
            write = sub not in _GIT_READ or (sub == "branch" and any(not a.startswith("-") for a in args[1:]))
            change |= write
            inspect &= not write
        elif p == "sed":
            change |= any(a.startswith("-i") for a in args)
        elif p == "find" and ("-delete" in args or any(a in ("-exec", "-execdir") for a in args)):
            i = next((k for k, a in enumerate(args) if a in ("-exec", "-execdir")), None)
            change |= "-delete" in args or (i is not None and _command_class(" ".join(args[i + 1:])) == "change")
        elif args and all(a.startswith("-") for a in args) and (p in _CHANGE or p in _REPL):
            pass  # `python3 --version`, `make -n`: asks, changes nothing
        elif p in _CHANGE or p.startswith("./"):
            change = True
            inspect = False
        elif p not in _INSPECT:
            inspect = False
    return "change" if change else "inspect" if inspect else "other"


_EXIT = re.compile(r"\[exit code (-?\d+)\]\s*$")
_TIMEOUT = re.compile(r"\[timed out after [^\]]*\]\s*$")
_PATHISH = re.compile(r"(?:/app/)?[\w.-]+\.[A-Za-z0-9]{1,8}\b|/app/[\w./-]+|`([\w.-]+)`")


def _mentioned_files(text: str) -> set[str]:
    out = set()
    for m in _PATHISH.finditer(text):
        tok = (m.group(1) or m.group(0)).strip("`").lower()
        tok = tok[len("/app/"):] if tok.startswith("/app/") else tok
        if tok and not tok.replace(".", "").isdigit():
            out.add(tok.rstrip("./"))
    return out


def _failed(text: str) -> bool:
    m = _EXIT.search(text.strip())
    return bool(_TIMEOUT.search(text.strip()) or (m and int(m.group(1)) != 0))


class TerminalRuleVerifier:
    """Command class (destructive / network / interactive / inspection / state-changing), relevance to
    the instruction's files, and what the last output says (retrying a just-failed command, early submit)."""

    env = "terminal"

    def score(self, ctx: StepContext, candidates: list[str]) -> list[float]:
        return [s["score"] for s in self.signals(ctx, candidates)]

    def signals(self, ctx: StepContext, candidates: list[str]) -> list[dict[str, float]]:
        clean, suggested = split_injections(ctx.observation.text)
        files = _mentioned_files(ctx.goal)
        if ctx.step == 0 or not ctx.history:
            files |= _mentioned_files(clean)  # the first observation lists /app
        past = [a.strip() for a, _ in ctx.history]
        last = past[-1] if past else None
        last_out = (ctx.history[-1][1] if ctx.history and ctx.history[-1][1] else ctx.observation.text) if past else ""
        last_failed = bool(last) and (_failed(last_out) or shows_tool_error(last_out))
        changed = any(self._changes_state(a) for a in past)
        out = []
        for cand in candidates:
            c = (cand or "").strip()
            sig = dict.fromkeys(SIGNALS["terminal"], 0.0)
            sig["injected"] = float(_norm(c) in suggested)
            words = {w.lower().strip("'\"`;,()") for w in re.split(r"\s+|/", c)}
            sig["mentions_file"] = float(bool(files & words) or any(f in c.lower() for f in files if len(f) >= 4))
            sig["repeat_failed"] = float(last_failed and c == last)
            sig["repeat_recent"] = float(c in past[-4:])
            kind = _command_class(c) if c and c.lower() != "submit" else None
            if c.lower() == "submit":
                sig["is_submit"] = 1.0
                sig["changed_before"] = float(changed)
                s = 0.05 if not changed else (0.3 if last_failed else 0.6)
            elif not c:
                s = 0.0
            elif kind == "destructive":
                sig["destructive"] = 1.0
                s = 0.02
            elif kind in ("network", "interactive"):
                sig[kind] = 1.0
                s = 0.1
            elif kind == "change":
                sig["state_change"] = 1.0
                s = 0.55 + 0.3 * sig["mentions_file"]
            else:
                sig["inspect"] = float(kind == "inspect")
                s = 0.4 + 0.1 * sig["mentions_file"]
            # re-running a command with nothing changed since gives the same result (or the same failure)
            # re-running a command with nothing changed since gives the same result (or the same failure);
            # redoing a change (mkdir, sed -i ...) is redundant unless it is a build/run that reads new inputs
            since = past[_last_index(past, c) + 1:] if c in past else []
            sig["stale_repeat"] = float(c in past and (not any(self._changes_state(a) and not _is_run(a) for a in since)
                                                       or (kind == "change" and not _is_run(c))))
            if sig["repeat_failed"]:
                s *= 0.25
            elif sig["stale_repeat"] and not sig["is_submit"]:
                s *= 0.35
            if sig["injected"]:
                s *= 0.15
            sig["score"] = clip01(s)
            out.append(sig)
        return out

    @staticmethod
    def _changes_state(cmd: str) -> bool:
        cmd = cmd.strip()
        return bool(cmd) and cmd.lower() != "submit" and _command_class(cmd) == "change"


_RUNNERS = {"make", "cmake", "python", "python3", "bash", "sh", "perl", "ruby", "node", "go", "cargo", "gcc", "cc",
            "g++", "javac"}


def _is_run(cmd: str) -> bool:
    """A build/run/check command: worth repeating after a fix, unlike a plain file change."""
    return any(p in _RUNNERS or p.startswith("./") for p, _ in _programs(cmd)) and not _REDIRECT.search(cmd)


def _last_index(items: list[str], item: str) -> int:
    return len(items) - 1 - items[::-1].index(item)


# ---------------------------------------------------------------------------------------- registry
SIGNALS: dict[str, tuple[str, ...]] = {
    "textworld": ("score", "admissible", "grounded", "injected", "expected", "later_step", "goal_overlap", "target",
                  "wrong_take", "repeat_last", "repeat_recent", "reverse", "undo_detour", "neutral", "move",
                  "partial_obs", "plan_known"),
    "code": ("score", "injected", "is_write", "same_as_written", "parses", "defines_entry", "ran_tests", "pass_frac",
             "is_run", "fresh_code", "is_submit", "tested_pass"),
    "terminal": ("score", "injected", "mentions_file", "repeat_failed", "repeat_recent", "is_submit", "changed_before",
                 "destructive", "network", "interactive", "state_change", "inspect", "stale_repeat"),
}
RULE_VERIFIERS = {"textworld": TextWorldRuleVerifier, "code": CodeRuleVerifier, "terminal": TerminalRuleVerifier}


def reversible_action(env_name: str, action: str) -> bool:
    """Whether the agent can take `action` back on its own, so a wrong one costs steps, not the episode: a move or
    a look (TextWorld), a read-only command (terminal), running the tests (code). What `router.grace` lets the SLM
    try before the teacher is called; a `take`, a write or a submit is never deferred."""
    if env_name == "textworld":
        verb = _norm(action).partition(" ")[0]
        return verb == "go" or verb in _NEUTRAL
    if env_name == "terminal":
        return _command_class(action or "") == "inspect"
    if env_name == "code":
        return _code_verb(action) == "run tests"
    return False


def rule_verifier(env_name: str, tasks: dict[str, Task] | None = None, limits=None):
    """The rule verifier of an env (`env.name`); `limits` (SandboxLimits) bound the code verifier's test runs."""
    if env_name not in RULE_VERIFIERS:
        raise R2VError(f"`env.name` = {env_name!r} has no rule verifier; choose one of {sorted(RULE_VERIFIERS)}")
    if env_name == "code":
        return CodeRuleVerifier(tasks=tasks, limits=limits)
    return RULE_VERIFIERS[env_name]()


__all__ = ["TextWorldRuleVerifier", "CodeRuleVerifier", "TerminalRuleVerifier", "rule_verifier", "reversible_action",
           "split_injections", "goal_plan", "SIGNALS"]
