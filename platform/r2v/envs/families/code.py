"""HumanEval-format problem families: list/string/arithmetic transformations with generated names,
constants and tests.

Every instance is a HumanEval row (task_id, prompt = signature + docstring with one `>>>` example,
entry_point, canonical_solution = the function body, test = `check(candidate)` with generated asserts).
Instances of a template differ in the function name, the docstring example and the constants (k, thresholds,
separators, moduli) that the docstring states, so the body has to be read off the prompt, not memorised. Expected
values come from a plain-Python reference written next to each body (never from executing generated code);
the tests check that the canonical body and the reference agree.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any, Callable

from r2v.envs.families import instance_rng, pick_templates

# Small parameter ranges and one parameter name per template: a from-scratch tiny SLM learns which constant
# of the docstring goes where when each value recurs in training (it does not learn to copy arbitrary names
# or numbers; with 8 names per template and wide ranges it solved none of 43 held-out instances).
N_TESTS = 8


@dataclass
class Spec:
    """One generated problem before it is rendered as a HumanEval row."""

    names: list[str]  # candidate function names (one is picked)
    params: list[tuple[str, str]]  # (name, annotation)
    returns: str
    doc: str  # one sentence, states every constant the body needs
    body: str  # the function body without indentation; may span lines
    ref: Callable[..., Any]  # the same function in plain Python: expected values
    inputs: list[tuple]  # argument tuples for the tests; inputs[0] is the docstring example


def _ints(rng: random.Random, n: int | None = None, lo: int = -20, hi: int = 40) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(3, 8) if n is None else n)]


def _words(rng: random.Random, n: int | None = None) -> list[str]:
    return ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 7)))
            for _ in range(rng.randint(2, 6) if n is None else n)]


def _list_inputs(rng, **kw) -> list[tuple]:
    return [(_ints(rng, **kw),) for _ in range(N_TESTS - 1)] + [([],)]


# ----------------------------------------------------------------------------------------- templates
def sum_multiples(rng):
    p, k = "nums", rng.randint(2, 6)
    return Spec(["sum_multiples", "sum_divisible", "total_of_multiples"], [(p, "list")], "int",
                f"Return the sum of the elements of {p} that are divisible by {k}.",
                f"return sum(x for x in {p} if x % {k} == 0)",
                lambda xs: sum(x for x in xs if x % k == 0), _list_inputs(rng))


def count_above(rng):
    p, t = "values", rng.randint(0, 5)
    return Spec(["count_above", "count_greater", "num_above"], [(p, "list")], "int",
                f"Return how many elements of {p} are greater than {t}.",
                f"return sum(1 for x in {p} if x > {t})",
                lambda xs: sum(1 for x in xs if x > t), _list_inputs(rng))


def clamp_list(rng):
    p, lo, hi = "xs", rng.randint(0, 4), rng.choice([10, 20])
    return Spec(["clamp_list", "clip_values", "bound_all"], [(p, "list")], "list",
                f"Return {p} with every element clamped to the range [{lo}, {hi}].",
                f"return [min(max(x, {lo}), {hi}) for x in {p}]",
                lambda xs: [min(max(x, lo), hi) for x in xs], _list_inputs(rng))


def scale_shift(rng):
    p, a, b = "items", rng.randint(2, 4), rng.randint(0, 3)
    return Spec(["scale_shift", "affine_map", "transform_all"], [(p, "list")], "list",
                f"Return a list with x * {a} + {b} for every element x of {p}.",
                f"return [x * {a} + {b} for x in {p}]",
                lambda xs: [x * a + b for x in xs], _list_inputs(rng))


def running_max(rng):
    p = "seq"
    return Spec(["running_max", "prefix_max", "cumulative_max"], [(p, "list")], "list",
                f"Return the running maximum of {p}: element i is max({p}[:i + 1]).",
                f"return [max({p}[:i + 1]) for i in range(len({p}))]",
                lambda xs: [max(xs[:i + 1]) for i in range(len(xs))], _list_inputs(rng))


def dedupe(rng):
    p = "arr"
    return Spec(["dedupe", "unique_in_order", "drop_duplicates"], [(p, "list")], "list",
                f"Return {p} without repeated elements, keeping the first occurrence of each, in order.",
                f"return list(dict.fromkeys({p}))",
                lambda xs: list(dict.fromkeys(xs)), _list_inputs(rng, lo=0, hi=6))


def caesar(rng):
    s, k = "text", rng.randint(1, 5)
    inputs = [(" ".join(_words(rng)),) for _ in range(N_TESTS - 1)] + [("",)]
    return Spec(["caesar", "shift_letters", "rotate_text"], [(s, "str")], "str",
                f"Shift every lowercase letter of {s} forward by {k} places in the alphabet, wrapping "
                f"around; leave other characters unchanged.",
                f"return ''.join(chr((ord(c) - 97 + {k}) % 26 + 97) if c.islower() else c for c in {s})",
                lambda t: "".join(chr((ord(c) - 97 + k) % 26 + 97) if c.islower() else c for c in t), inputs)


def fib_mod(rng):
    n, m = "n", rng.choice([7, 10, 11, 13, 17])

    def ref(i):
        a, b = 0, 1
        for _ in range(i):
            a, b = b, (a + b) % m
        return a

    inputs = [(rng.randint(0, 60),) for _ in range(N_TESTS - 1)] + [(0,)]
    return Spec(["fib_mod", "fibonacci_mod", "nth_fib_mod"], [(n, "int")], "int",
                f"Return the {n}-th Fibonacci number modulo {m} (fib(0) = 0, fib(1) = 1).",
                f"a, b = 0, 1\nfor _ in range({n}):\n    a, b = b, (a + b) % {m}\nreturn a", ref, inputs)


def count_chars(rng):
    s, letters = "word", rng.choice(["aeiou", "xyz", "abc", "rst"])
    inputs = [(" ".join(_words(rng)),) for _ in range(N_TESTS - 1)] + [("",)]
    return Spec(["count_letters", "count_chars", "letter_count"], [(s, "str")], "int",
                f"Return how many characters of {s} are one of the letters '{letters}'.",
                f"return sum(1 for c in {s} if c in '{letters}')",
                lambda t: sum(1 for c in t if c in letters), inputs)


def reverse_words(rng):
    s, sep = "line", rng.choice([" ", ",", "-", ";", "/"])
    inputs = [(sep.join(_words(rng)),) for _ in range(N_TESTS)]
    return Spec(["reverse_words", "flip_order", "reverse_parts"], [(s, "str")], "str",
                f"Split {s} on '{sep}' and return the parts in reverse order, joined by '{sep}'.",
                f"return '{sep}'.join(reversed({s}.split('{sep}')))",
                lambda t: sep.join(reversed(t.split(sep))), inputs)


def long_words(rng):
    p, n = "words", rng.randint(2, 6)
    inputs = [(_words(rng),) for _ in range(N_TESTS - 1)] + [([],)]
    return Spec(["long_words", "filter_long", "keep_long"], [(p, "list")], "list",
                f"Return the strings of {p} whose length is at least {n}, in order.",
                f"return [w for w in {p} if len(w) >= {n}]",
                lambda ws: [w for w in ws if len(w) >= n], inputs)


def poly_eval(rng):
    x, a, b, c = "x", rng.randint(1, 3), rng.randint(0, 3), rng.randint(0, 3)
    inputs = [(rng.randint(-10, 10),) for _ in range(N_TESTS)]
    return Spec(["poly", "quadratic", "eval_poly"], [(x, "int")], "int",
                f"Return {a} * {x}**2 + {b} * {x} + {c}.",
                f"return {a} * {x} ** 2 + {b} * {x} + {c}",
                lambda v: a * v ** 2 + b * v + c, inputs)


TEMPLATES: dict[str, Callable[[random.Random], Spec]] = {f.__name__: f for f in (
    sum_multiples, count_above, clamp_list, scale_shift, running_max, dedupe, caesar, fib_mod, count_chars,
    reverse_words, long_words, poly_eval)}


# ----------------------------------------------------------------------------------------- rendering
def render(spec: Spec, rng: random.Random, task_id: str) -> dict:
    """A HumanEval row (plus `reference` values) from a spec."""
    ep = rng.choice(spec.names)
    sig = ", ".join(f"{n}: {a}" for n, a in spec.params)
    example = spec.inputs[0]
    call = f"{ep}({', '.join(map(repr, example))})"
    prompt = (f"def {ep}({sig}) -> {spec.returns}:\n    \"\"\"{spec.doc}\n    >>> {call}\n"
              f"    {spec.ref(*example)!r}\n    \"\"\"\n")
    body = "".join(f"    {line}\n" for line in spec.body.splitlines())
    asserts = "".join(f"    assert candidate({', '.join(map(repr, args))}) == {spec.ref(*args)!r}\n"
                      for args in spec.inputs)
    return {"task_id": task_id, "prompt": prompt, "entry_point": ep, "canonical_solution": body,
            "test": f"def check(candidate):\n{asserts}"}


def generate(seed: int, instances: int, templates: list[str] | None = None) -> list[dict]:
    """`instances` HumanEval rows per template; ids `proc/<template>/<index>`."""
    rows = []
    for name in pick_templates(TEMPLATES, templates, "env.code.procedural.templates"):
        for i in range(instances):
            rng = instance_rng("code", seed, name, i)
            rows.append(render(TEMPLATES[name](rng), rng, f"proc/{name}/{i}"))
    return rows
