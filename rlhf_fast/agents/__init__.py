"""Agentic rollouts: tools behind one interface, multi-turn rollouts that insert their
results with loss mask 0, ARPO / AEPO rollout trees, and an embedded task where the tools
help.

- ``tools.py``: ``Tool`` (name, call pattern, function, time limit), ``ToolBox`` (finds the
  call that ended a round, runs calls under their time limits, wraps results in
  ``<result>...</result>``), ``ToolError``; failures become ``error: ...`` results;
- ``calculator.py``: ``<python>``, restricted evaluation of arithmetic expressions (no code
  execution), with bounded sizes, depth and time;
- ``search.py``: ``<search>`` over a ``KnowledgeBase`` (the package ships one);
- ``branching.py``: ARPO's step entropy and branch probability, AEPO's consecutive-branch
  penalty and global-sample split;
- ``rollout.py``: ``ToolRollout``, the round-by-round multi-turn rollout and its trees;
- ``task.py``: the ``shop`` task (products, prices, priced products) and its warm-up.

The trainers are ``rlhf_fast.trainers.agentic`` (``rlhf-fast train arpo|aepo``).
"""

# rlhf_fast.trainers imports this package (trainers/agentic.py) and this package imports its
# batch and generation modules: loading the trainers first makes either import order work.
from .. import trainers as _trainers  # noqa: F401
from .branching import (
    aepo_branch_probability,
    arpo_branch_probability,
    global_samples,
    step_entropy,
)
from .calculator import CalculatorLimits, calculate, calculator_tool, evaluate_expression
from .rollout import AgentTrajectory, BranchingRule, RolloutTree, ToolRollout
from .search import KnowledgeBase, packaged_knowledge, search_tool
from .task import AGENT_TASKS, ShopTask, get_agent_task
from .tools import (
    RESULT_CLOSE,
    RESULT_OPEN,
    Tool,
    ToolBox,
    ToolError,
    ToolOutcome,
    default_toolbox,
)

__all__ = [
    "AGENT_TASKS", "RESULT_CLOSE", "RESULT_OPEN", "AgentTrajectory", "BranchingRule",
    "CalculatorLimits", "KnowledgeBase", "RolloutTree", "ShopTask", "Tool", "ToolBox",
    "ToolError", "ToolOutcome", "ToolRollout", "aepo_branch_probability",
    "arpo_branch_probability", "calculate", "calculator_tool", "default_toolbox",
    "evaluate_expression", "get_agent_task", "global_samples", "packaged_knowledge",
    "search_tool", "step_entropy",
]
