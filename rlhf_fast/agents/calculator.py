"""A calculator for Python arithmetic expressions that never executes code.

``evaluate_expression("37*48")`` parses the text with ``ast.parse(mode="eval")`` and walks the
tree itself, accepting only this grammar (anything else raises ``ToolError`` naming what was
refused):

- numbers: ``int`` and ``float`` literals (``True`` / ``False`` too); no strings, bytes,
  complex numbers, containers;
- operators: ``+ - * / // % **``, unary ``+ - not``, comparisons ``== != < <= > >=``
  (chained), ``and`` / ``or``;
- names: the constants ``pi``, ``e``, ``tau`` and calls of ``abs round min max sqrt exp log
  log2 log10 sin cos tan floor ceil gcd`` with positional arguments.

Refused: attribute access, subscripts, names outside the whitelist (every dunder name),
lambdas, comprehensions, conditional expressions, assignments, f-strings, keyword or
starred arguments, and statements (``import`` is not an expression, so it does not parse).

Bounds, checked before the work is done so that nothing large is ever computed: the input
length, the nesting depth and node count of the tree, the digits of every integer (inputs
and intermediate results), the size of a power's result predicted from its operands
(``b ** n`` has about ``n * log10|b|`` digits), and a time limit checked at every node.
Complex or non-finite results are refused.
"""

from __future__ import annotations

import ast
import math
import operator
import time
from dataclasses import dataclass

from .tools import Tool, ToolError


@dataclass(frozen=True)
class CalculatorLimits:
    """What the calculator accepts."""

    max_chars: int = 200
    """Longest expression (characters)."""

    max_depth: int = 20
    """Deepest nesting of the expression tree (each operator, call or operand is a level)."""

    max_nodes: int = 200
    """Most nodes in the expression tree."""

    max_digits: int = 100
    """Most decimal digits of any integer, given or computed."""

    time_limit: float = 0.25
    """Seconds of evaluation before it stops with an error."""


BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
          ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
          ast.Pow: operator.pow}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_}
COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
           ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}
CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
FUNCTIONS = {"abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt,
             "exp": math.exp, "log": math.log, "log2": math.log2, "log10": math.log10,
             "sin": math.sin, "cos": math.cos, "tan": math.tan, "floor": math.floor,
             "ceil": math.ceil, "gcd": math.gcd}
SYMBOLS = {ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|",
           ast.BitXor: "^", ast.MatMult: "@", ast.Invert: "~", ast.Is: "is",
           ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in"}
REFUSED = {ast.Attribute: "attribute access", ast.Subscript: "indexing",
           ast.Lambda: "lambda", ast.ListComp: "comprehensions",
           ast.SetComp: "comprehensions", ast.DictComp: "comprehensions",
           ast.GeneratorExp: "comprehensions", ast.IfExp: "conditional expressions",
           ast.NamedExpr: "assignment", ast.JoinedStr: "strings",
           ast.Starred: "starred arguments", ast.Await: "await", ast.Yield: "yield",
           ast.YieldFrom: "yield", ast.List: "lists", ast.Tuple: "tuples", ast.Set: "sets",
           ast.Dict: "dicts", ast.Slice: "slices"}

Number = int | float | bool


def evaluate_expression(text: str, limits: CalculatorLimits = CalculatorLimits()) -> Number:
    """The value of the arithmetic expression ``text``; ``ToolError`` for anything outside
    the grammar or the limits (module docstring)."""
    if not isinstance(text, str):
        raise ToolError("the expression must be text")
    text = text.strip()
    if not text:
        raise ToolError("empty expression")
    if len(text) > limits.max_chars:
        raise ToolError(f"expression too long ({len(text)} characters, at most "
                        f"{limits.max_chars})")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as error:
        raise ToolError(f"not a single arithmetic expression ({error.msg})") from None
    except (RecursionError, MemoryError, ValueError):
        raise ToolError("expression too deeply nested") from None
    nodes = sum(1 for _ in ast.walk(tree))
    if nodes > limits.max_nodes:
        raise ToolError(f"expression too large ({nodes} nodes, at most {limits.max_nodes})")
    return _Evaluator(limits).visit(tree.body, 1)


def format_number(value: Number) -> str:
    """The calculator's result as text: integers in full, floats to 12 significant
    digits, booleans as ``True`` / ``False``."""
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    return format(value, ".12g")


def calculate(text: str, limits: CalculatorLimits = CalculatorLimits()) -> str:
    """``format_number(evaluate_expression(text))``: the tool function of the calculator."""
    return format_number(evaluate_expression(text, limits))


class _Evaluator:
    """Walks an expression tree, checking every node against the grammar and the limits."""

    def __init__(self, limits: CalculatorLimits):
        self.limits = limits
        self.bound = 10**limits.max_digits
        self.deadline = time.perf_counter() + limits.time_limit

    def visit(self, node: ast.AST, depth: int) -> Number:
        if depth > self.limits.max_depth:
            raise ToolError(f"expression too deeply nested (more than {self.limits.max_depth}"
                            " levels)")
        if time.perf_counter() > self.deadline:
            raise ToolError(f"time limit of {self.limits.time_limit} s exceeded")
        if type(node) in REFUSED:
            raise ToolError(f"{REFUSED[type(node)]} not allowed")
        method = getattr(self, f"visit_{type(node).__name__}", None)
        if method is None:
            raise ToolError(f"{type(node).__name__} not allowed: only arithmetic on numbers")
        return self.checked(method(node, depth + 1))

    def checked(self, value: object) -> Number:
        """Only real, finite numbers, and integers below ``10 ** max_digits`` in size."""
        if isinstance(value, bool):
            return value
        if isinstance(value, int):
            if abs(value) >= self.bound:
                raise ToolError(f"integer too large (more than {self.limits.max_digits} "
                                "digits)")
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ToolError("numerical overflow (the value is not finite)")
            return value
        if isinstance(value, complex):
            raise ToolError("the result is not a real number")
        raise ToolError(f"{type(value).__name__} values not allowed: only numbers")

    def visit_Constant(self, node: ast.Constant, depth: int) -> Number:
        if type(node.value) not in (int, float, bool):
            kind = "strings" if isinstance(node.value, str | bytes) else \
                f"{type(node.value).__name__} values"
            raise ToolError(f"{kind} not allowed: only numbers")
        return node.value

    def visit_Name(self, node: ast.Name, depth: int) -> Number:
        if node.id.startswith("_"):
            raise ToolError(f"name {node.id!r} not allowed: names starting with '_' are "
                            "refused")
        if node.id not in CONSTANTS:
            hint = " (a function: call it)" if node.id in FUNCTIONS else ""
            raise ToolError(f"unknown name {node.id!r}{hint}; constants: "
                            f"{', '.join(CONSTANTS)}")
        return CONSTANTS[node.id]

    def visit_UnaryOp(self, node: ast.UnaryOp, depth: int) -> Number:
        op = UNARY.get(type(node.op))
        if op is None:
            raise ToolError(f"operator {SYMBOLS.get(type(node.op), '?')} not allowed")
        return op(self.visit(node.operand, depth))

    def visit_BinOp(self, node: ast.BinOp, depth: int) -> Number:
        op = BINARY.get(type(node.op))
        if op is None:
            raise ToolError(f"operator {SYMBOLS.get(type(node.op), '?')} not allowed")
        left, right = self.visit(node.left, depth), self.visit(node.right, depth)
        if isinstance(node.op, ast.Pow):
            self.check_power(left, right)
        try:
            return op(left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except OverflowError:
            raise ToolError("numerical overflow") from None

    def check_power(self, base: Number, exponent: Number) -> None:
        """Refuse a power whose result would have more than ``max_digits`` digits (or
        overflow a float), before computing it."""
        size = abs(float(base))               # operands are bounded: float() cannot overflow
        if size <= 1 or exponent <= 0:
            return
        digits = float(exponent) * math.log10(size)
        if digits > self.limits.max_digits:
            raise ToolError(f"power too large (about {digits:.3g} digits, at most "
                            f"{self.limits.max_digits})")

    def visit_BoolOp(self, node: ast.BoolOp, depth: int) -> Number:
        values = [self.visit(v, depth) for v in node.values]
        result = values[0]
        for v in values[1:]:
            result = (result and v) if isinstance(node.op, ast.And) else (result or v)
        return result

    def visit_Compare(self, node: ast.Compare, depth: int) -> Number:
        left = self.visit(node.left, depth)
        result = True
        for op_node, right_node in zip(node.ops, node.comparators, strict=True):
            op = COMPARE.get(type(op_node))
            if op is None:
                raise ToolError(f"comparison {SYMBOLS.get(type(op_node), '?')} not allowed")
            right = self.visit(right_node, depth)
            result = result and op(left, right)
            left = right
        return result

    def visit_Call(self, node: ast.Call, depth: int) -> Number:
        if not isinstance(node.func, ast.Name):
            self.visit(node.func, depth)   # names what is refused (attribute access, ...)
            raise ToolError("only the calculator's functions can be called: "
                            f"{', '.join(FUNCTIONS)}")
        name = node.func.id
        if name.startswith("_"):
            raise ToolError(f"name {name!r} not allowed: names starting with '_' are refused")
        if name not in FUNCTIONS:
            raise ToolError(f"unknown function {name!r}; functions: {', '.join(FUNCTIONS)}")
        if node.keywords:
            raise ToolError("keyword arguments not allowed")
        args = [self.visit(a, depth) for a in node.args]
        if name == "round" and len(args) == 2 and abs(args[1]) > self.limits.max_digits:
            raise ToolError(f"round() to more than {self.limits.max_digits} digits")
        try:
            return FUNCTIONS[name](*args)
        except (TypeError, ValueError) as error:
            raise ToolError(f"{name}(): {error}") from None
        except OverflowError:
            raise ToolError(f"{name}(): numerical overflow") from None


def calculator_tool(limits: CalculatorLimits = CalculatorLimits(), *, name: str = "python",
                    time_limit: float = 1.0) -> Tool:
    """``<python>expression</python>``: the calculator as a tool (the name follows ARPO's
    Python tool; only the arithmetic grammar above is evaluated)."""
    return Tool(name, lambda text: calculate(text, limits), time_limit=time_limit,
                max_call_chars=limits.max_chars)
