"""The README's set-up commands are the ones CI and users run, and its Python examples run.

Convention for README code blocks (also in docs/README.md):

- a block fenced ```python is EXECUTED by ``test_readme_python_block_runs``: each block on its
  own, in a fresh namespace, in this process on the CPU (conftest's TRITON_INTERPRET=1
  applies), with torch's global seed reset first. So every block is self-contained: its own
  imports, small tensors or a tiny model built from a config, a few seconds at most;
- a block fenced ```py is shown with Python highlighting but never executed: for code that
  cannot run on a CPU CI machine (CUDA, torchrun, a downloaded model, a long run);
- ```bash blocks are not executed; the two set-up commands are checked below.
"""

import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```$", re.S | re.M)


def readme_commands() -> list[str]:
    text = README.read_text()
    return re.findall(r"```bash\n(pip install torch==[^\n]+)\n```", text)


def fenced_blocks() -> list[tuple[str, int, str]]:
    """(language, line of the opening fence, code) of every fenced block of the README."""
    text = README.read_text()
    return [(m.group(2), text.count("\n", 0, m.start()) + 1, m.group(3))
            for m in FENCE.finditer(text)]


PYTHON_BLOCKS = [(line, code) for lang, line, code in fenced_blocks() if lang == "python"]


def test_readme_has_the_two_setup_commands():
    commands = readme_commands()
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert main_job.endswith("rlhf-fast bench")
    assert tests.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_every_fence_names_its_language():
    """An unlabelled fence would be neither run nor clearly marked as not run."""
    unlabelled = [line for lang, line, _ in fenced_blocks() if not lang]
    assert not unlabelled, f"README.md lines {unlabelled}: fence them ```python, ```py, ..."
    assert len(PYTHON_BLOCKS) >= 5, "the README's examples are executed: keep them ```python"


@pytest.mark.parametrize("line, code", PYTHON_BLOCKS,
                         ids=[f"README.md:{line}" for line, _ in PYTHON_BLOCKS])
def test_readme_python_block_runs(line, code):
    torch.manual_seed(0)
    namespace = {"__name__": "__readme__"}
    # Padded so that a traceback's line numbers are the README's.
    exec(compile("\n" * line + code, str(README), "exec"), namespace)


def test_submodules_used_by_the_readme_are_attributes_after_import_rlhf_fast():
    """``rlhf_fast.gae.gae(...)`` after a bare ``import rlhf_fast``, without importing the
    submodules up front (fresh interpreter: this process has imported them already)."""
    code = ("import sys, rlhf_fast\n"
            "lazy = ('advantages', 'gae', 'value', 'kl_control', 'reward_shaping', 'reference')\n"
            "assert not [m for m in lazy if 'rlhf_fast.' + m in sys.modules], sys.modules\n"
            "assert set(lazy) <= set(dir(rlhf_fast))\n"
            "assert callable(rlhf_fast.gae.gae) and callable(rlhf_fast.value.value_loss)\n"
            "assert callable(rlhf_fast.advantages.group_advantages)\n"
            "assert callable(rlhf_fast.kl_control.kl_penalized_rewards)\n"
            "assert callable(rlhf_fast.reward_shaping.overlong_penalty)\n"
            "assert callable(rlhf_fast.reference.policy_loss)\n"
            "try:\n    rlhf_fast.no_such_thing\nexcept AttributeError as e:\n"
            "    assert 'no_such_thing' in str(e)\nelse:\n    raise SystemExit('no error')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
