"""Which of cosmic-ray's mutants count, and how a surviving one is named.

cosmic-ray replaces every binary operator by each of the ten others, every comparison by
each of the nine others, and so on: most of those are not a change anyone would make by
mistake (``a * b`` -> ``a << b``) and all of them cost a test run. A run keeps the
single-point changes a careless edit makes to a formula:

- ``+`` <-> ``-``, ``*`` <-> ``/``, ``**`` -> ``*``, ``//`` -> ``/``, ``&`` <-> ``|``;
- ``<`` <-> ``<=``, ``>`` <-> ``>=``, ``<`` <-> ``>``, ``<=`` <-> ``>=``, ``==`` <->
  ``!=``, ``is`` <-> ``is not``, ``in`` <-> ``not in``;
- a dropped unary ``-``, ``not`` or ``~``; an added ``not``; ``and`` <-> ``or``;
  ``True`` <-> ``False``; a number + 1; a ``for`` loop that runs zero times;
  ``break`` <-> ``continue``.

Mutants are skipped (not run, not counted) on the bare ``*`` of a signature, inside type
annotations (never evaluated:
the modules use ``from __future__ import annotations``), inside the arguments of a
``raise`` (the error message's text) and inside the functions a module lists in
``skip_functions`` (ahead-of-time compile specs and launch glue, not formulas).
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache

KEPT_OPERATORS = {
    *(f"core/ReplaceBinaryOperator_{a}_{b}" for a, b in (
        ("Add", "Sub"), ("Sub", "Add"), ("Mul", "Div"), ("Div", "Mul"), ("Pow", "Mul"),
        ("FloorDiv", "Div"), ("BitAnd", "BitOr"), ("BitOr", "BitAnd"))),
    *(f"core/ReplaceComparisonOperator_{a}_{b}" for a, b in (
        ("Lt", "LtE"), ("LtE", "Lt"), ("Gt", "GtE"), ("GtE", "Gt"), ("Lt", "Gt"),
        ("Gt", "Lt"), ("LtE", "GtE"), ("GtE", "LtE"), ("Eq", "NotEq"), ("NotEq", "Eq"),
        ("Is", "IsNot"), ("IsNot", "Is"), ("In", "NotIn"), ("NotIn", "In"))),
    "core/ReplaceUnaryOperator_Delete_USub", "core/ReplaceUnaryOperator_Delete_Not",
    "core/ReplaceUnaryOperator_Delete_Invert", "core/AddNot", "core/ReplaceAndWithOr",
    "core/ReplaceOrWithAnd", "core/ReplaceTrueWithFalse", "core/ReplaceFalseWithTrue",
    "core/NumberReplacer", "core/ZeroIterationForLoop", "core/ReplaceBreakWithContinue",
    "core/ReplaceContinueWithBreak",
}


@lru_cache(maxsize=64)
def _excluded_spans(source: str) -> tuple[tuple[tuple[int, int], tuple[int, int], str], ...]:
    """(start, end, why) of every annotation and every raise statement's arguments."""
    spans = []

    def add(node: ast.AST | None, why: str) -> None:
        if node is not None:
            spans.append(((node.lineno, node.col_offset),
                          (node.end_lineno, node.end_col_offset), why))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            add(node.returns, "annotation")
            args = node.args
            for arg in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg,
                        args.kwarg):
                if arg is not None:
                    add(arg.annotation, "annotation")
        elif isinstance(node, ast.AnnAssign):
            add(node.annotation, "annotation")
        elif isinstance(node, ast.Raise):
            add(node.exc, "error message")
    return tuple(spans)


def _function_spans(source: str, names: tuple[str, ...]):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
            yield (node.lineno, 0), (node.end_lineno, node.end_col_offset)


def skip_reason(source: str, mutation, skip_functions: list[str]) -> str | None:
    """Why a mutant is not run (None: it is a formula change and runs)."""
    if mutation.operator_name not in KEPT_OPERATORS:
        return "operator not in the kept list"
    if mutation.operator_name == "core/NumberReplacer" and mutation.occurrence % 2:
        return "number - 1 (the + 1 change of the same constant runs)"
    start = tuple(mutation.start_pos)
    line = source.splitlines()[start[0] - 1]
    if line[start[1]:].startswith("*") and line[start[1] + 1:].lstrip()[:1] in (",", ")"):
        return "keyword-only marker"  # cosmic-ray sees the bare * of a signature as a product
    for lo, hi, why in _excluded_spans(source):
        if lo <= start < hi:
            return why
    for lo, hi in _function_spans(source, tuple(skip_functions)):
        if lo <= start < hi:
            return "skipped function"
    return None


def mutant_key(module: str, lines: list[str], line_no: int, col: int, operator: str) -> str:
    """A name for a mutant that survives edits elsewhere in its file: the module, the
    stripped source line, the column within the stripped line (with ``#n`` when the same
    stripped line occurs earlier in the file: the n-th occurrence) and the operator."""
    line = lines[line_no - 1]
    stripped = line.strip()
    offset = col - (len(line) - len(line.lstrip()))
    occurrence = sum(other.strip() == stripped for other in lines[:line_no - 1])
    where = f"{offset}#{occurrence + 1}" if occurrence else f"{offset}"
    return f"{module} | {stripped} | {where} | {operator}"


ROW = re.compile(r"^\|\s*`(?P<module>[^`]+)`\s*\|\s*`(?P<line>(?:[^`\\]|\\.)+)`\s*\|\s*"
                 r"(?P<col>\d+(?:#\d+)?)\s*\|\s*`(?P<operator>[^`]+)`\s*\|")


def equivalent_keys(markdown: str) -> dict[str, str]:
    """Keys of the mutants listed as equivalent in docs/testing.md, with their reasons.

    Rows of the table: ``| `module` | `stripped line` | column | `operator` | reason |``,
    with ``|`` inside the line written ``\\|``."""
    keys = {}
    for row in markdown.splitlines():
        match = ROW.match(row)
        if match:
            line = match["line"].replace("\\|", "|")
            keys[f"{match['module']} | {line} | {match['col']} | {match['operator']}"] = \
                row.rsplit("|", 2)[-2].strip()
    return keys
