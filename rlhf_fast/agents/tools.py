"""Tools behind one interface, and the text format that calls them.

A ``Tool`` is a name, a call pattern (an opening and a closing tag: ``<python>...</python>``),
a function from the call's text to the result's text, and a time limit. A model calls a tool
by writing the call pattern; generation stops at the closing tag, the ``ToolBox`` runs the
function on the text between the tags, and the rollout appends the result wrapped in the
result tags (``<result>...</result>``) as inserted text: the model attends to it, the loss
never trains on it::

    37*48=<python>37*48</python><result>1776</result>1776<eos>
          ^^^^^^^^^^^^^^^^^^^^^^ generated        ^^^^^^^^^ generated
                                ^^^^^^^^^^^^^^^^^^ inserted (loss mask 0)

A tool never raises into the trainer: a ``ToolError`` (refused input), any other exception,
a result that is not text and a call that runs past the time limit all become a result
``error: <reason>`` that the model reads like any other. Built-in tools (``calculator.py``,
``search.py``) never execute code.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
"""Tags around every tool result."""


class ToolError(Exception):
    """Raised by a tool function for input it refuses; the model sees ``error: <message>``."""


@dataclass(frozen=True)
class Tool:
    """One tool: ``function(call_text) -> result_text``, called by the model writing
    ``open_tag + call_text + close_tag``."""

    name: str
    """Identifier (metrics, error messages)."""

    function: Callable[[str], str]
    """The call's text (between the tags) -> the result's text. Raise ``ToolError`` for
    input it refuses."""

    open_tag: str = ""
    """Opening tag of the call pattern; empty: ``<name>``."""

    close_tag: str = ""
    """Closing tag (generation stops after it); empty: ``</name>``."""

    time_limit: float = 5.0
    """Seconds a call may take; past it the model gets a time-limit error (the call's
    thread is abandoned, so a tool must bound its own work: the built-in ones do)."""

    max_call_chars: int = 1000
    """Longest call text accepted."""

    max_result_chars: int = 400
    """Longer results are cut to this many characters (ending in ``...``)."""

    def __post_init__(self) -> None:
        if not self.name or not callable(self.function):
            raise ValueError(f"a tool needs a name and a callable function, got "
                             f"{self.name!r}, {self.function!r}")
        if not self.open_tag:
            object.__setattr__(self, "open_tag", f"<{self.name}>")
        if not self.close_tag:
            object.__setattr__(self, "close_tag", f"</{self.name}>")
        if not self.time_limit > 0:
            raise ValueError(f"time_limit must be > 0, got {self.time_limit}")


@dataclass(frozen=True)
class ToolCall:
    """A call found at the end of a generated round."""

    tool: Tool | None
    """The tool whose closing tag ended the round (None: no tool call)."""

    text: str
    """The text between the tags."""

    well_formed: bool = True
    """False when the closing tag has no opening tag before it."""


@dataclass(frozen=True)
class ToolOutcome:
    """What a call returned."""

    text: str
    """The result's text (``error: ...`` on failure), without the result tags."""

    error: bool
    """The call failed: refused input, an exception, a time-out, a malformed call."""

    seconds: float = 0.0
    """Wall time of the call."""


class ToolBox:
    """The tools a rollout offers: finds the call that ended a round, runs calls (each in its
    own thread, under its time limit, all of a round's calls at once) and wraps results."""

    def __init__(self, tools: Iterable[Tool], *, result_open: str = RESULT_OPEN,
                 result_close: str = RESULT_CLOSE):
        self.tools = list(tools)
        if not self.tools:
            raise ValueError("a ToolBox needs at least one tool")
        names = [t.name for t in self.tools]
        tags = [tag for t in self.tools for tag in (t.open_tag, t.close_tag)]
        if len(set(names)) != len(names) or len(set(tags)) != len(tags):
            raise ValueError(f"tool names and tags must be unique, got {names}, {tags}")
        if result_open in tags or result_close in tags:
            raise ValueError("the result tags must differ from every tool's tags")
        self.result_open, self.result_close = result_open, result_close

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Generation stops after any closing tag."""
        return tuple(t.close_tag for t in self.tools)

    @property
    def tags(self) -> tuple[str, ...]:
        """Every tag of the format (tools' and results'), e.g. to add them to a tokenizer."""
        return (*(tag for t in self.tools for tag in (t.open_tag, t.close_tag)),
                self.result_open, self.result_close)

    def find_call(self, text: str) -> ToolCall:
        """The call closed by the first closing tag in ``text`` (a generated round): the
        text after the last matching opening tag before it."""
        ends = [(text.find(t.close_tag), t) for t in self.tools if t.close_tag in text]
        if not ends:
            return ToolCall(None, "")
        end, tool = min(ends, key=lambda x: x[0])
        start = text.rfind(tool.open_tag, 0, end)
        if start < 0:
            return ToolCall(tool, "", well_formed=False)
        return ToolCall(tool, text[start + len(tool.open_tag):end])

    def run(self, calls: Sequence[ToolCall]) -> list[ToolOutcome]:
        """Run every call, all at once (one thread each), and wait for each up to its
        tool's time limit. Never raises for what a tool does: failures are ``error: ...``
        outcomes."""
        slots: list[ToolOutcome | None] = [None] * len(calls)
        threads: list[threading.Thread | None] = []
        start = time.perf_counter()
        for i, call in enumerate(calls):
            if call.tool is None:
                raise ValueError(f"call {i} names no tool")
            if not call.well_formed:
                slots[i] = ToolOutcome(f"error: {call.tool.close_tag} without "
                                       f"{call.tool.open_tag} before it", True)
                threads.append(None)
                continue
            thread = threading.Thread(target=_call_into, args=(call, slots, i), daemon=True)
            thread.start()
            threads.append(thread)
        for i, (call, thread) in enumerate(zip(calls, threads, strict=True)):
            if thread is None:
                continue
            thread.join(max(0.0, start + call.tool.time_limit - time.perf_counter()))
            if thread.is_alive() or slots[i] is None:
                slots[i] = ToolOutcome(f"error: {call.tool.name} ran past its time limit of "
                                       f"{call.tool.time_limit:g} s", True,
                                       time.perf_counter() - start)
        return [s for s in slots if s is not None]

    def wrap(self, outcome: ToolOutcome) -> str:
        """The inserted text: the result between the result tags."""
        return f"{self.result_open}{outcome.text}{self.result_close}"


def _call_into(call: ToolCall, slots: list, i: int) -> None:
    """Run one call and store its outcome (in a worker thread)."""
    tool = call.tool
    start = time.perf_counter()
    try:
        if len(call.text) > tool.max_call_chars:
            raise ToolError(f"call too long ({len(call.text)} characters, at most "
                            f"{tool.max_call_chars})")
        result = tool.function(call.text)
        if not isinstance(result, str):
            raise ToolError(f"{tool.name} returned {type(result).__name__}, not text")
        outcome_text, error = result, False
    except ToolError as refused:
        outcome_text, error = f"error: {refused}", True
    except Exception as failure:      # the model sees every failure as a result
        outcome_text, error = f"error: {type(failure).__name__}: {failure}", True
    if len(outcome_text) > tool.max_result_chars:
        outcome_text = outcome_text[:max(0, tool.max_result_chars - 3)] + "..."
    slots[i] = ToolOutcome(outcome_text, error, time.perf_counter() - start)


def default_toolbox() -> ToolBox:
    """The built-in tools: ``<python>`` (the safe calculator) and ``<search>`` (the packaged
    knowledge base)."""
    from .calculator import calculator_tool
    from .search import search_tool

    return ToolBox([calculator_tool(), search_tool()])
