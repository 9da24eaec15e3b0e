"""
The calculator tool the chat model calls between <|python_start|> and <|python_end|>.

A whitelist evaluator over Python's `ast`, not `eval`: numbers, + - * / // ( ), unary minus/plus, and
`'string literal'.count('string literal')`; everything else is refused. Operands are bounded (expression
length, integer size) and a deadline is checked while walking the tree; no signals, so any thread works.
"""

import ast
import math
import operator
import time

MAX_EXPR_CHARS = 1000  # longer "expressions" are not calculator calls
MAX_INT_BITS = 1024  # any integer literal or intermediate beyond ~308 digits is refused
MAX_DEPTH = 64  # nesting depth of the syntax tree (parentheses, unary minus chains)
CALC_TIMEOUT = 3.0  # seconds; the reference's SIGALRM budget, enforced here by a deadline
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv}


class _Refused(Exception):
    pass


def _strip_commas_outside_strings(expr):
    # "1,234 * 2" -> "1234 * 2" (the model writes thousands separators), but "'a,b'.count(',')" keeps its
    # literals intact (the reference removed every comma, which changed string arguments).
    out, quote = [], None
    for ch in expr:
        if quote is None:
            if ch in "'\"":
                quote = ch
            elif ch == ",":
                continue
        elif ch == quote:
            quote = None
        out.append(ch)
    return "".join(out)


def _check_number(x):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise _Refused(f"not a number: {type(x).__name__}")
    if isinstance(x, int) and x.bit_length() > MAX_INT_BITS:
        raise _Refused("integer too large")
    if isinstance(x, float) and not math.isfinite(x):
        raise _Refused("non-finite result")
    return x


def _eval_node(node, deadline, depth):
    if depth > MAX_DEPTH:
        raise _Refused("expression nested too deeply")
    if time.monotonic() > deadline:
        raise _Refused("time limit")
    if isinstance(node, ast.Expression):
        return _eval_node(node.body, deadline, depth + 1)
    if isinstance(node, ast.Constant):
        # numbers only: strings are legal solely as the receiver/argument of .count, handled below
        return _check_number(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval_node(node.operand, deadline, depth + 1)
        return _check_number(-v if isinstance(node.op, ast.USub) else +v)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        # `**` (ast.Pow) is refused on purpose: a few tokens can ask for an astronomically large number, and
        # GSM8K-style calls never use it. Operands are <= MAX_INT_BITS, so even a product is cheap.
        a = _eval_node(node.left, deadline, depth + 1)
        b = _eval_node(node.right, deadline, depth + 1)
        return _check_number(_BINOPS[type(node.op)](a, b))
    if isinstance(node, ast.Call):
        # exactly  'literal'.count('literal')  - no keywords, no start/end, no chained methods
        f = node.func
        if (isinstance(f, ast.Attribute) and f.attr == "count" and isinstance(f.value, ast.Constant)
                and isinstance(f.value.value, str) and len(node.args) == 1 and not node.keywords
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            return f.value.value.count(node.args[0].value)
        raise _Refused("only 'string'.count('x') calls are allowed")
    raise _Refused(f"{type(node).__name__} is not allowed")


def _format_result(x):
    # whole-number floats print without ".0" (the GSM8K annotations the model learned write "<<10/2=5>>"),
    # other floats with 12 significant digits (0.1+0.2 gives "0.3", not "0.30000000000000004")
    if isinstance(x, int):
        return str(x)
    if x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return f"{x:.12g}"


def use_calculator(expr, timeout=CALC_TIMEOUT):
    """The result of a calculator expression the model wrote, as a string; None when it is refused (outside
    the whitelist), invalid, or fails (division by zero, ...). Never raises; safe from any thread."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return None
    expr = _strip_commas_outside_strings(expr).strip()
    if not expr:
        return None
    deadline = time.monotonic() + timeout
    try:
        return _format_result(_eval_node(ast.parse(expr, mode="eval"), deadline, 0))
    except (_Refused, SyntaxError, ValueError, ArithmeticError, RecursionError, MemoryError, TypeError):
        return None
