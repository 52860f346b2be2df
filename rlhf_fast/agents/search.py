"""A search tool over a small knowledge base shipped with the package (no network).

``KnowledgeBase`` holds entries ``{"title", "text"}`` (a JSON-lines file; the package ships
``knowledge.jsonl``: made-up prices of 48 goods, which the embedded agentic task asks about).
``search(query)`` scores every entry by the query's words it contains (a word of the title
counts twice) and returns the texts of the best ``top_k``, best first, ties in file order;
``no results`` when no word matches. Deterministic, no code execution, bounded work (the
query is cut to ``max_query_words`` words).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from .tools import Tool, ToolError

WORD = re.compile(r"[a-z0-9]+")
PACKAGED = "knowledge.jsonl"
"""The knowledge base shipped in ``rlhf_fast/agents/``."""


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words."""
    return WORD.findall(text.lower())


@dataclass(frozen=True)
class Entry:
    """One document of the knowledge base."""

    title: str
    text: str


class KnowledgeBase:
    """Entries searched by word overlap."""

    def __init__(self, entries: list[Entry], *, top_k: int = 1, max_query_words: int = 16):
        if not entries:
            raise ValueError("a knowledge base needs at least one entry")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.entries, self.top_k, self.max_query_words = entries, top_k, max_query_words
        self._title_words = [set(words(e.title)) for e in entries]
        self._text_words = [set(words(e.text)) for e in entries]

    @classmethod
    def from_jsonl(cls, path: str | Path | None = None, **kwargs) -> KnowledgeBase:
        """Entries from a JSON-lines file of ``{"title": ..., "text": ...}`` objects (None:
        the packaged ``knowledge.jsonl``)."""
        text = _read(path)
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("title"), str) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path or PACKAGED}:{number}: each line needs string "
                                 f"'title' and 'text' fields, got {row!r}")
            entries.append(Entry(row["title"], row["text"]))
        return cls(entries, **kwargs)

    def search(self, query: str) -> str:
        """Texts of the best-matching entries joined by ``" | "``, or ``no results``."""
        query_words = set(words(query)[:self.max_query_words])
        if not query_words:
            raise ToolError("empty query: write words to search for")
        scored = []
        for i, (title, text) in enumerate(zip(self._title_words, self._text_words,
                                              strict=True)):
            score = 2 * len(query_words & title) + len(query_words & text)
            if score:
                scored.append((-score, i))
        if not scored:
            return "no results"
        return " | ".join(self.entries[i].text for _, i in sorted(scored)[:self.top_k])

    def lookup(self, title: str) -> Entry:
        """The entry titled ``title`` (``KeyError`` if none)."""
        for entry in self.entries:
            if entry.title == title:
                return entry
        raise KeyError(title)

    def digest(self) -> str:
        """A short hash of the entries (part of cache keys that depend on them)."""
        blob = json.dumps([[e.title, e.text] for e in self.entries]).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@cache
def packaged_knowledge() -> KnowledgeBase:
    """The knowledge base shipped with the package (loaded once)."""
    return KnowledgeBase.from_jsonl()


def search_tool(knowledge: KnowledgeBase | None = None, *, name: str = "search",
                time_limit: float = 1.0) -> Tool:
    """``<search>query</search>`` over ``knowledge`` (default: the packaged one)."""
    knowledge = knowledge if knowledge is not None else packaged_knowledge()
    return Tool(name, knowledge.search, time_limit=time_limit, max_call_chars=200)


def _read(path: str | Path | None) -> str:
    if path is None:
        return (resources.files("rlhf_fast.agents") / PACKAGED).read_text(encoding="utf-8")
    return Path(path).read_text(encoding="utf-8")
