"""The calculator tool: nanochat's arithmetic and .count() subset, refusals, caps, thread safety."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoctl.tools.calculator import MAX_RESULT_CHARS, strip_number_commas, use_calculator


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("1 + 2 * 3", "7"),
        ("(1 + 2) * 3", "9"),
        ("48/2", "24.0"),  # str() of the Python value, as nanochat (models were trained on this)
        ("7 // 2", "3"),
        ("-7 % 3", "2"),
        ("-(-3)", "3"),
        ("2**10", "1024"),
        ("1,234 * 2", "2468"),  # commas inside numbers are stripped, as nanochat
        ("1,000,000 / 4", "250000.0"),
        ("0.1 * 3 > 0.3", "True"),
        ("3 < 4 < 5", "True"),
        ("3 < 4 > 5", "False"),
        ("'strawberry'.count('r')", "3"),
        ('"banana".count("an")', "2"),
        ("'a,b,c'.count(',')", "2"),  # commas inside strings survive
        ("'ab' + 'cd'", "abcd"),
        ("  12  ", "12"),
    ],
)
def test_allowed_expressions(expr: str, expected: str) -> None:
    assert use_calculator(expr) == expected


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('echo hi')",  # imports / builtins
        "import os",
        "(1).__class__",  # attribute access / dunders
        "''.__class__.__mro__",
        "'abc'.upper()",  # attributes other than .count
        "open('/etc/passwd').read()",
        "lambda: 1",
        "(lambda x: x)(1)",
        "x + 1",  # names
        "[1, 2][0]",
        "{'a': 1}",
        "1 if True else 2",
        "(x := 5)",
        "f'{1}'",
        "b'abc'",
        "1j * 1j",
        "'abc'.count('a', 1)",  # only the one-argument form
        "(1).count(1)",
        "'a' in 'abc'",
        "not 1",
    ],
)
def test_refused_expressions_give_error_strings(expr: str) -> None:
    out = use_calculator(expr)
    assert out.startswith("error: "), (expr, out)


@pytest.mark.parametrize(
    ("expr", "reason"),
    [
        ("2**100000", "exponent too large"),
        ("10**10**10", "exponent too large"),
        ("9**9**9", "exponent too large"),
        ("'a' * 100000", "string longer"),
        ("'ab' * 10**9", "string longer"),
        ("1/0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("1e308 * 10", "overflow"),
        ("2.0 ** 100000", "overflow"),
        ("", "empty"),
        ("1 +", "invalid"),
        ("1" * 2000, "longer than"),
        ("-" * 500 + "1", "nested too deeply"),
    ],
)
def test_caps_and_failures(expr: str, reason: str) -> None:
    out = use_calculator(expr)
    assert out.startswith("error: ") and reason in out, (expr, out)


def test_result_length_cap() -> None:
    # 2**3000 has 904 digits (allowed), its square would be 1807 (refused at the result cap)
    assert len(use_calculator("2**3000")) == 904
    out = use_calculator("2**3000 * 2**3000")
    assert out == f"error: result longer than {MAX_RESULT_CHARS} characters"


def test_time_cap_is_a_deadline_not_a_signal() -> None:
    assert use_calculator("1 + 1", timeout_s=-1) == "error: timed out"


def test_works_off_the_main_thread() -> None:
    # nanochat's SIGALRM version raises "signal only works in main thread" here.
    results: list[str] = []
    t = threading.Thread(target=lambda: results.append(use_calculator("'strawberry'.count('r') * 2")))
    t.start()
    t.join(10)
    assert results == ["6"]


def test_worst_case_allowed_work_is_fast() -> None:
    # The largest things the caps allow, repeated to the expression-length cap, stay well under a second.
    expr = " * ".join(["(3**6000)"] * 60)
    t0 = time.perf_counter()
    out = use_calculator(expr)
    assert time.perf_counter() - t0 < 1.0
    assert out.startswith("error: ")  # the product exceeds the integer-size or result cap


def test_strip_number_commas() -> None:
    assert strip_number_commas("1,234,567 + 'x,y'.count(',')") == "1234567 + 'x,y'.count(',')"
    assert strip_number_commas("(1, 2)") == "(1, 2)"


_ints = st.integers(min_value=-10_000, max_value=10_000)


@st.composite
def _arith(draw: st.DrawFn, depth: int = 3) -> str:
    if depth == 0 or draw(st.booleans()):
        return str(draw(_ints))
    op = draw(st.sampled_from(["+", "-", "*", "//", "%", "/"]))
    return f"({draw(_arith(depth - 1))} {op} {draw(_arith(depth - 1))})"


@settings(max_examples=200, deadline=None)
@given(_arith())
def test_matches_python_arithmetic(expr: str) -> None:
    try:
        expected = str(eval(expr, {"__builtins__": {}}))  # the reference: trusted, generated input
    except ZeroDivisionError:
        expected = "error: division by zero"
    except OverflowError:
        expected = "error: result overflowed"
    assert use_calculator(expr) == expected


@pytest.mark.parametrize(
    "shape",
    ["1" * 10_000_000, "1," * 5_000_000, " " * 10_000_000 + "1+1", "'" + "a" * 10_000_000 + "'", "(" * 10_000_000],
    ids=["digits", "digit-commas", "padded", "string", "parens"],
)
def test_huge_input_is_refused_before_any_pass_over_it(shape: str) -> None:
    # The cap is checked first: no copy of the input is made (the old order stripped commas first,
    # ~95 MB and ~1 s for 10 MB). Allocation is deterministic where time is not.
    import tracemalloc

    tracemalloc.start()
    try:
        out = use_calculator(shape)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.startswith("error: expression longer than")
    assert peak < 64 * 1024, peak
