"""The calculator tool: a hand-written accept/reject set, threads, and random arithmetic against Python's own."""

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanochat.calculator import use_calculator



@pytest.mark.parametrize("expr, expected", [
    ("2+3", "5"),
    ("10/4", "2.5"),
    ("10/2", "5"),           # whole-number floats print without ".0", like the GSM8K annotations
    ("12*4-3", "45"),
    ("(5+3)*2", "16"),
    ("-3 - -2", "-1"),
    ("+4", "4"),
    ("7//2", "3"),
    ("2*.5", "1"),
    ("0.1+0.2", "0.3"),
    ("1/3", "0.333333333333"),
    ("1,234 * 2", "2468"),   # thousands separators
    (" 3 * 4 ", "12"),
    ("123456789*987654321", str(123456789 * 987654321)),
    ("'strawberry'.count('r')", "3"),
    ('"banana".count("a")', "3"),
    ("'a,b,c'.count(',')", "2"),  # commas inside string literals are kept
    ("'abc'.count('a') + 1", "2"),
])
def test_calculator_accepts(expr, expected):
    assert use_calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    "__import__('os')",
    "__import__('os').system('echo pwned')",
    "().__class__",
    "().__class__.__bases__[0].__subclasses__()",
    "9**9**9",
    "2**10",                  # exponentiation refused outright
    "'a'*10**9",
    "'a'*1000",               # string arithmetic
    "'a'+'b'",
    "open('x')",
    "exec('1')",
    "eval('1+1')",
    "x",
    "x+1",
    "abs(-1)",
    "len('abc')",
    "[1, 2][0]",
    "(1, 2)",
    "{}",
    "lambda: 1",
    "[i for i in range(10**9)]",
    "1 if 1 else 2",
    "1 < 2",
    "3 % 2",
    "True + 1",
    "1j * 2",
    "'ab'.count(x)",
    "'ab'.count('a', 0)",    # only the one-argument form
    "'abc'.upper().count('A')",
    "'abc'.__len__()",
    "str.count('aa', 'a')",
    "9" * 400,               # a huge literal
    "9" * 200 + "*" + "9" * 200,  # a huge product
    "1e308*10",              # overflow to inf
    "1/0",
    "-" * 500 + "1",         # pathological nesting
    "(" * 300 + "1" + ")" * 300,
    "1" * 2000,              # too long
    "",
    "   ",
    "import os",
    "2+3; 4",
    None,
])
def test_calculator_refuses(expr):
    assert use_calculator(expr) is None


def test_calculator_off_main_thread():
    out = {}

    def work():
        out["ok"] = use_calculator("6*7")
        out["bad"] = use_calculator("9**9**9")
        out["count"] = use_calculator("'mississippi'.count('s')")

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive()
    assert out == {"ok": "42", "bad": None, "count": "4"}
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(use_calculator, [f"{i}*{i}" for i in range(50)]))
    assert results == [str(i * i) for i in range(50)]


def test_calculator_matches_python_on_random_arithmetic():
    # independent check: random small expressions agree with Python's own arithmetic
    import random
    rng = random.Random(0)
    for _ in range(200):
        a, b, c = rng.randint(-999, 999), rng.randint(1, 999), rng.randint(-99, 99)
        op1, op2 = rng.choice("+-*/"), rng.choice("+-*")
        expr = f"({a} {op1} {b}) {op2} {c}"
        got = use_calculator(expr)
        want = eval(expr)  # trusted: we built the string from integers and operators
        assert got is not None
        assert math.isclose(float(got), want, rel_tol=1e-9, abs_tol=1e-9), expr
