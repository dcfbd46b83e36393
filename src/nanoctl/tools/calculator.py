"""The calculator tool the model calls with `<|python_start|>expr<|python_end|>`.

nanochat `eval`s the expression under a SIGALRM timeout, which breaks off the main thread and on
Windows (nanochat PR #784). Here a small AST interpreter walks a whitelisted subset instead:

- numbers (commas inside numbers are stripped, as nanochat does: ``1,234 * 2``), string literals;
- ``+ - * / // % **``, unary ``+ -``, comparisons (chains too), parentheses;
- ``<str>.count(<str>)`` (nanochat's only string helper, e.g. ``'strawberry'.count('r')``).

Everything else (names, attributes, imports, dunders, lambdas, subscripts, ...) is refused. The time
cap is a deadline checked at every node (thread-safe, no signals); each single operation is bounded by
size caps (exponent size, integer bits, string length), so no one step can run long. `use_calculator`
never raises: failures come back as an ``error: ...`` string the engine shows the model.
"""

from __future__ import annotations

import ast
import math
import operator
import time
from collections.abc import Callable
from typing import Any

MAX_EXPR_CHARS = 1_000  # longer "expressions" are not arithmetic the model should be doing
MAX_INT_BITS = 100_000  # ~30k decimal digits: plenty for arithmetic, cheap to multiply
MAX_POW_BITS = 10_000  # refuse a ** b when the result would need more bits than this
MAX_STR_LEN = 10_000  # string literals and string results ("ab" * n)
MAX_RESULT_CHARS = 1_000  # what gets forced back into the model's context
MAX_DEPTH = 100  # nesting depth (guards Python's recursive parser/walker)
DEFAULT_TIMEOUT_S = 3.0  # as nanochat

Number = int | float


class CalculatorError(Exception):
    """Raised inside the evaluator; `use_calculator` turns it into an error string."""


_BINOPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_CMPOPS: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_OP_SYMBOL = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
}


def strip_number_commas(expr: str) -> str:
    """Drop commas that sit between digits outside string literals ("1,234" -> "1234").

    nanochat strips every comma; keeping those inside quotes lets ``'a,b'.count(',')`` work too.
    """
    out: list[str] = []
    quote: str | None = None
    for i, ch in enumerate(expr):
        if quote:
            out.append(ch)
            if ch == quote and expr[i - 1] != "\\":
                quote = None
        elif ch in "'\"":
            quote = ch
            out.append(ch)
        elif ch == "," and out and out[-1].isdigit() and i + 1 < len(expr) and expr[i + 1].isdigit():
            continue
        else:
            out.append(ch)
    return "".join(out)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_size(x: Any) -> Any:
    if isinstance(x, bool):
        return x
    if isinstance(x, int) and x.bit_length() > MAX_INT_BITS:
        raise CalculatorError("number too large")
    if isinstance(x, float) and math.isinf(x):
        raise CalculatorError("result overflowed")
    if isinstance(x, str) and len(x) > MAX_STR_LEN:
        raise CalculatorError(f"string longer than {MAX_STR_LEN} characters")
    return x


def _check_pow(base: Any, exp: Any) -> None:
    if not (_is_number(base) and _is_number(exp)):
        raise CalculatorError("** needs numbers")
    # Only int ** positive int is costly (float pow is O(1) and overflows loudly). The result needs
    # ~exp * log2|base| bits: refuse before computing, not after.
    if isinstance(base, int) and isinstance(exp, int) and exp > 0 and abs(base) > 1:
        if exp > MAX_POW_BITS or exp * math.log2(abs(base)) > MAX_POW_BITS:
            raise CalculatorError("exponent too large")


def _check_mul(a: Any, b: Any) -> None:
    # str * int allocates len * n characters: check the size before Python builds it.
    for s, n in ((a, b), (b, a)):
        if isinstance(s, str):
            if not isinstance(n, int) or isinstance(n, bool):
                raise CalculatorError("a string can only be repeated by an integer")
            if len(s) * max(n, 0) > MAX_STR_LEN:
                raise CalculatorError(f"string longer than {MAX_STR_LEN} characters")


class _Evaluator:
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def eval(self, node: ast.AST, depth: int = 0) -> Any:
        if time.monotonic() > self.deadline:
            raise CalculatorError("timed out")
        if depth > MAX_DEPTH:
            raise CalculatorError("expression nested too deeply")
        d = depth + 1
        if isinstance(node, ast.Expression):
            return self.eval(node.body, d)
        if isinstance(node, ast.Constant):
            v = node.value
            if _is_number(v) or isinstance(v, str):
                return _check_size(v)
            raise CalculatorError(f"unsupported literal {type(v).__name__}")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            v = self.eval(node.operand, d)
            if not _is_number(v):
                raise CalculatorError("unary +/- needs a number")
            return -v if isinstance(node.op, ast.USub) else +v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            a = self.eval(node.left, d)
            b = self.eval(node.right, d)
            op = type(node.op)
            if op is ast.Pow:
                _check_pow(a, b)
            elif op is ast.Mult:
                _check_mul(a, b)
            elif op is ast.Add and isinstance(a, str) and isinstance(b, str):
                pass  # concatenation; the size is checked below
            elif not (_is_number(a) and _is_number(b)):
                raise CalculatorError(f"{_OP_SYMBOL[op]} needs numbers")
            try:
                result = _BINOPS[op](a, b)
            except ZeroDivisionError:
                raise CalculatorError("division by zero") from None
            except OverflowError:
                raise CalculatorError("result overflowed") from None
            if isinstance(result, complex):
                raise CalculatorError("complex result")
            return _check_size(result)
        if isinstance(node, ast.Compare):
            left = self.eval(node.left, d)
            for op_node, right_node in zip(node.ops, node.comparators, strict=True):
                if type(op_node) not in _CMPOPS:
                    raise CalculatorError(f"unsupported comparison {type(op_node).__name__}")
                right = self.eval(right_node, d)
                try:
                    ok = _CMPOPS[type(op_node)](left, right)
                except TypeError:
                    raise CalculatorError("cannot compare these values") from None
                if not ok:
                    return False
                left = right
            return True
        if isinstance(node, ast.Call):
            return self._call(node, d)
        raise CalculatorError(f"{type(node).__name__} is not allowed")

    def _call(self, node: ast.Call, depth: int) -> Any:
        func = node.func
        if not (isinstance(func, ast.Attribute) and func.attr == "count"):
            raise CalculatorError("only <string>.count(<string>) calls are allowed")
        if node.keywords or len(node.args) != 1:
            raise CalculatorError(".count() takes exactly one argument")
        target = self.eval(func.value, depth)
        needle = self.eval(node.args[0], depth)
        if not (isinstance(target, str) and isinstance(needle, str)):
            raise CalculatorError(".count() works on strings only")
        return target.count(needle)


def evaluate(expr: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Number | str | bool:
    """Evaluate `expr` with the whitelist above; raise CalculatorError when refused."""
    # Length first, before any pass over the input: stripping digit commas at most halves it, so
    # anything longer than twice the cap can only be refused (a 10 MB input costs microseconds).
    if len(expr) > 2 * MAX_EXPR_CHARS + 2:
        raise CalculatorError(f"expression longer than {MAX_EXPR_CHARS} characters")
    expr = strip_number_commas(expr.strip())
    if not expr:
        raise CalculatorError("empty expression")
    if len(expr) > MAX_EXPR_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPR_CHARS} characters")
    deadline = time.monotonic() + timeout_s
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalculatorError("invalid expression") from None
    return _Evaluator(deadline).eval(tree)


def format_result(value: Number | str | bool) -> str:
    """str() as nanochat (so 48/2 -> '24.0', matching what models were trained on), length-capped."""
    try:
        text = str(value)
    except ValueError:  # int too large to print (sys.set_int_max_str_digits)
        raise CalculatorError("result too long") from None
    if len(text) > MAX_RESULT_CHARS:
        raise CalculatorError(f"result longer than {MAX_RESULT_CHARS} characters")
    return text


def use_calculator(expr: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Evaluate a tool call and return the text to force back into the model; never raises."""
    try:
        return format_result(evaluate(expr, timeout_s))
    except CalculatorError as e:
        return f"error: {e}"
    except Exception as e:  # belt and braces: a tool call must never take generation down
        return f"error: {type(e).__name__}"
