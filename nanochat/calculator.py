"""
The calculator tool the chat model calls between <|python_start|> and <|python_end|>.

A whitelist evaluator over Python's `ast`, not `eval`: numbers, + - * / // ( ), unary minus/plus, and
`'string literal'.count('string literal')`. Everything else is refused. Every operand is bounded
(expression length, integer size), so one evaluation costs microseconds whatever the input; a deadline is
still checked while walking the tree. Neither needs signals, so it works in any thread.
"""

import ast
import math
import time


MAX_EXPR_CHARS = 1000  # longer "expressions" are not calculator calls
MAX_INT_BITS = 1024  # any integer literal or intermediate beyond ~308 digits is refused
MAX_DEPTH = 64  # nesting depth of the syntax tree (parentheses, unary minus chains)
CALC_TIMEOUT = 3.0  # seconds; the reference's SIGALRM budget, enforced here by a deadline


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
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv)):
        # `**` (ast.Pow) is refused on purpose: one short token sequence can ask for an astronomically
        # large number, and GSM8K-style calculator calls never use it (the reference refuses it too).
        a = _eval_node(node.left, deadline, depth + 1)
        b = _eval_node(node.right, deadline, depth + 1)
        if isinstance(node.op, ast.Add):
            r = a + b
        elif isinstance(node.op, ast.Sub):
            r = a - b
        elif isinstance(node.op, ast.Mult):
            r = a * b  # both operands are <= MAX_INT_BITS, so this is cheap; the result is checked
        elif isinstance(node.op, ast.Div):
            r = a / b
        else:
            r = a // b
        return _check_number(r)
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
    # integers print as integers; floats that are whole numbers print without ".0" (the GSM8K annotations
    # the model was trained on write "<<10/2=5>>"), other floats with 12 significant digits so that
    # 0.1+0.2 gives "0.3" rather than "0.30000000000000004".
    if isinstance(x, int):
        return str(x)
    if x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return f"{x:.12g}"


def use_calculator(expr, timeout=CALC_TIMEOUT):
    """
    Evaluate a calculator expression the model wrote. Returns the result as a string, or None when the
    expression is refused (anything outside the whitelist), invalid, or fails (division by zero, ...).
    Never raises, never uses signals; safe to call from any thread.
    """
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return None
    expr = _strip_commas_outside_strings(expr).strip()
    if not expr:
        return None
    deadline = time.monotonic() + timeout
    try:
        tree = ast.parse(expr, mode="eval")
        return _format_result(_eval_node(tree, deadline, 0))
    except (_Refused, SyntaxError, ValueError, ZeroDivisionError, OverflowError, ArithmeticError,
            RecursionError, MemoryError, TypeError):
        return None
