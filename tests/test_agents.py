"""The agentic building blocks without a model: the calculator's grammar and bounds, the
search tool and its packaged knowledge base, the tool box (errors become results, time
limits), the branching formulas of ARPO / AEPO, and the rollout trees on a scripted
generator (exactly M trajectories a prompt, prefix sharing, branch rates, AEPO's
consecutive-branch counter, tool-call and length budgets)."""

import builtins
import itertools
import math
import re
import time

import pytest
import torch

from rlhf_fast.agents import (
    RESULT_CLOSE,
    RESULT_OPEN,
    BranchingRule,
    CalculatorLimits,
    KnowledgeBase,
    Tool,
    ToolBox,
    ToolError,
    ToolRollout,
    aepo_branch_probability,
    arpo_branch_probability,
    calculate,
    default_toolbox,
    evaluate_expression,
    get_agent_task,
    global_samples,
    packaged_knowledge,
    search_tool,
    step_entropy,
)
from rlhf_fast.agents.branching import top_share
from rlhf_fast.trainers import Completion, SamplingParams

# --- the calculator ------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("37*48", 1776), ("2**100", 2**100), ("7/2", 3.5), ("7//2", 3), ("-7 % 3", 2),
    ("(1+2)*3 - 4", 5), ("3 < 4 <= 4", True), ("1 == 2 or 2 != 3", True), ("not 0", True),
    ("abs(-5) + max(1, 9, 3) - min(4, 2)", 12), ("round(2.675, 2)", round(2.675, 2)),
    ("sqrt(16) + floor(2.7) + ceil(2.1)", 9.0), ("gcd(12, 18)", 6), ("log10(1000)", 3.0),
    ("2 * pi", 2 * math.pi), ("exp(1) == e", True), ("  1_000 + 1  ", 1001),
    ("10**99 - 1", 10**99 - 1), ("2**-3", 0.125),
])
def test_calculator_evaluates_arithmetic(text, value):
    assert evaluate_expression(text) == value


def test_calculator_formats_results():
    assert calculate("37*48") == "1776"
    assert calculate("0.1 + 0.2") == "0.3"           # 12 significant digits
    assert calculate("2 > 1") == "True"


@pytest.mark.parametrize("text, reason", [
    ("import os", "not a single arithmetic expression"),
    ("__import__('os')", "names starting with '_' are refused"),
    ("__import__('os').system('echo hacked')", "attribute access not allowed"),
    ("(1)(2)", "only the calculator's functions can be called"),
    ("__builtins__", "names starting with '_' are refused"),
    ("(1).__class__", "attribute access not allowed"),
    ("math.pi", "attribute access not allowed"),
    ("open('/etc/passwd')", "unknown function 'open'"),
    ("eval('1+1')", "unknown function 'eval'"),
    ("exec", "unknown name 'exec'"),
    ("x + 1", "unknown name 'x'"),
    ("sqrt", "a function: call it"),
    ("lambda: 1", "lambda not allowed"),
    ("[x for x in (1, 2)]", "comprehensions not allowed"),
    ("max(x for x in (1, 2))", "comprehensions not allowed"),
    ("sum((1, 2))", "unknown function 'sum'"),
    ("{x: 1 for x in (1,)}", "comprehensions not allowed"),
    ("(1, 2)[0]", "indexing not allowed"),
    ("[1, 2]", "lists not allowed"),
    ("'abc' * 3", "strings not allowed"),
    ("f'{1}'", "strings not allowed"),
    ("1 if 2 else 3", "conditional expressions not allowed"),
    ("(y := 3)", "assignment not allowed"),
    ("max(*(1, 2))", "starred arguments not allowed"),
    ("round(2.5, ndigits=1)", "keyword arguments not allowed"),
    ("1 << 10", "operator << not allowed"),
    ("3 & 1", "operator & not allowed"),
    ("1 in (1, 2)", "not allowed"),
    ("2j", "complex values not allowed"),
    ("(-8) ** 0.5", "not a real number"),
    ("9 ** 999999", "power too large"),
    ("2 ** 10 ** 10", "power too large"),
    ("10**60 * 10**60", "integer too large"),
    ("1" * 120, "integer too large"),
    ("exp(1000)", "overflow"),
    ("1e308 * 10", "overflow"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("sqrt(-1)", "math domain error"),
    ("gcd(1.5, 2)", "gcd()"),
    ("min()", "min()"),
    ("-" * 30 + "1", "too deeply nested"),
    ("abs(" * 25 + "1" + ")" * 25, "too deeply nested"),
    ("1+" * 120 + "1", "expression too long"),
    ("", "empty expression"),
    ("1 +", "not a single arithmetic expression"),
])
def test_calculator_refuses_everything_outside_its_grammar(text, reason):
    with pytest.raises(ToolError, match=re.escape(reason)):
        evaluate_expression(text)


def test_calculator_bounds_are_its_limits():
    tight = CalculatorLimits(max_chars=10, max_depth=3, max_nodes=8, max_digits=5)
    assert evaluate_expression("99999", tight) == 99999
    with pytest.raises(ToolError, match="more than 5 digits"):
        evaluate_expression("99999+1", tight)
    with pytest.raises(ToolError, match="too long"):
        evaluate_expression("1+1+1+1+1+1", tight)
    with pytest.raises(ToolError, match=r"too large .* nodes"):
        evaluate_expression("1+2+3+4", tight)
    with pytest.raises(ToolError, match="too deeply nested"):
        evaluate_expression("-(-(-1))", tight)


def test_calculator_never_executes_code(tmp_path, monkeypatch):
    """No eval / exec anywhere: with both gone the calculator still works, and a payload
    that would create a file is refused before anything runs."""
    def forbidden(*_, **__):
        raise AssertionError("the calculator must not call eval or exec")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert calculate("6*7") == "42"
    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path('{marker}').touch()"
    outcome = default_toolbox().run([default_toolbox().find_call(f"<python>{payload}</python>")])
    assert outcome[0].error and outcome[0].text == "error: attribute access not allowed"
    assert not marker.exists()


# --- search and the packaged knowledge base ------------------------------------------------

def test_packaged_knowledge_base_is_shipped_and_searchable():
    kb = packaged_knowledge()
    assert len(kb.entries) == 48 and len({e.title for e in kb.entries}) == 48
    assert all(len(e.title) == 5 and e.text.startswith(f"{e.title} costs ") for e in kb.entries)
    entry = kb.entries[7]
    assert kb.search(entry.title) == entry.text
    assert kb.search(f"What does {entry.title.upper()} cost?") == entry.text
    assert kb.search("quantum chromodynamics") == "no results"
    with pytest.raises(ToolError, match="empty query"):
        kb.search("  ?! ")
    tool = search_tool()
    assert (tool.name, tool.open_tag, tool.close_tag) == ("search", "<search>", "</search>")


def test_knowledge_base_from_a_file_ranks_titles_first(tmp_path):
    path = tmp_path / "kb.jsonl"
    path.write_text('{"title": "red fox", "text": "the fox is red"}\n\n'
                    '{"title": "blue whale", "text": "a whale, not a fox"}\n')
    kb = KnowledgeBase.from_jsonl(path, top_k=2)
    assert kb.search("fox") == "the fox is red | a whale, not a fox"
    assert kb.search("whale fox") == "a whale, not a fox | the fox is red"
    assert kb.digest() != packaged_knowledge().digest()
    path.write_text('{"name": "no title"}\n')
    with pytest.raises(ValueError, match=r"kb\.jsonl:1: each line needs string 'title'"):
        KnowledgeBase.from_jsonl(path)


# --- the tool box: calls, results, errors, time limits ---------------------------------------

def test_toolbox_finds_calls_and_wraps_results():
    box = default_toolbox()
    assert box.stop_strings == ("</python>", "</search>")
    assert box.tags[-2:] == (RESULT_OPEN, RESULT_CLOSE)
    call = box.find_call("let me compute <python>37*48</python>")
    assert call.tool.name == "python" and call.text == "37*48" and call.well_formed
    assert box.find_call("<search>a</search> then <python>1</python>").tool.name == "search"
    assert box.find_call("no call here").tool is None
    bad = box.find_call("oops</python>")
    outcome = box.run([bad])[0]
    assert outcome.error and outcome.text == "error: </python> without <python> before it"
    outcomes = box.run([call, box.find_call("<search>apple</search>"),
                        box.find_call("<python>1/0</python>")])
    assert [o.text for o in outcomes] == ["1776", packaged_knowledge().search("apple"),
                                          "error: division by zero"]
    assert [o.error for o in outcomes] == [False, False, True]
    assert box.wrap(outcomes[0]) == "<result>1776</result>"


def test_tool_failures_become_results_never_exceptions():
    def crash(text):
        raise RuntimeError(f"cannot handle {text}")

    def slow(text):
        time.sleep(2.0)
        return "late"

    box = ToolBox([Tool("crash", crash), Tool("slow", slow, time_limit=0.05),
                   Tool("number", lambda text: 42), Tool("echo", lambda text: text * 100,
                                                          max_result_chars=20)])
    calls = [box.find_call(f"<{name}>hi</{name}>") for name in ("crash", "slow", "number",
                                                                 "echo")]
    crashed, late, number, echo = box.run(calls)
    assert crashed.error and crashed.text == "error: RuntimeError: cannot handle hi"
    assert late.error and late.text == "error: slow ran past its time limit of 0.05 s"
    assert number.error and number.text == "error: number returned int, not text"
    assert not echo.error and echo.text == "hi" * 8 + "h..." and len(echo.text) == 20
    long_call = box.find_call("<crash>" + "x" * 2000 + "</crash>")
    assert box.run([long_call])[0].text == \
        "error: call too long (2000 characters, at most 1000)"


def test_toolbox_rejects_ambiguous_tags():
    def f(text):
        return text

    with pytest.raises(ValueError, match="unique"):
        ToolBox([Tool("a", f), Tool("b", f, open_tag="<a>")])
    with pytest.raises(ValueError, match="result tags"):
        ToolBox([Tool("result", f)])
    with pytest.raises(ValueError, match="time_limit"):
        Tool("a", f, time_limit=0)


# --- branching formulas ----------------------------------------------------------------------

@pytest.mark.parametrize("delta, probability", [
    (-5.0, 0.0), (-2.5, 0.0), (-1.0, 0.3), (0.0, 0.5), (1.0, 0.7), (2.5, 1.0), (4.0, 1.0)])
def test_arpo_branch_probability_is_half_plus_a_fifth_of_the_entropy_change(delta,
                                                                            probability):
    assert arpo_branch_probability(delta) == pytest.approx(probability)
    assert aepo_branch_probability(delta, 0) == pytest.approx(probability)   # l = 0


def test_aepo_penalty_decays_with_consecutive_branching_rounds():
    # P = clip(1 - tau / (1 - 0.05 l) + w dH, 0, 1)
    assert aepo_branch_probability(1.0, 1) == pytest.approx(1 - 0.5 / 0.95 + 0.2)
    assert aepo_branch_probability(1.0, 10) == pytest.approx(0.2)          # clip(0.2 dH)
    assert aepo_branch_probability(4.0, 10) == pytest.approx(0.8)
    assert aepo_branch_probability(10.0, 19) == 0.0                        # 1 - 10 + 2 < 0
    assert aepo_branch_probability(100.0, 20) == 0.0 and aepo_branch_probability(1.0, 40) == 0
    values = [aepo_branch_probability(1.5, n) for n in range(22)]
    assert all(a >= b for a, b in itertools.pairwise(values)) and values[0] > 0.7
    with pytest.raises(ValueError, match="consecutive"):
        aepo_branch_probability(0.0, -1)


def test_global_sample_split_and_step_entropy():
    # m = clip(floor(k sigmoid(beta (H_root - H_tool))) + 1, 1, k)
    assert global_samples(8, 1.0, 1.0) == 5                       # floor(4) + 1
    assert global_samples(16, 1.0, 1.0) == 9
    assert global_samples(8, 3.0, 0.0) == 7                       # floor(8 * 0.8176) + 1
    assert global_samples(8, 0.0, 3.0) == 2                       # floor(8 * 0.1824) + 1
    assert global_samples(8, 100.0, 0.0) == 8 and global_samples(8, 0.0, 100.0) == 1
    assert step_entropy([1.0, 2.0, 3.0], 2, 64) == pytest.approx(3.0 / math.log(64))
    assert step_entropy([1.0], 20, 64) == pytest.approx(1.0 / math.log(64))
    assert top_share([5, 0, 2, 1, 1]) == (8, 9) and top_share([]) == (0, 0)


# --- rollout trees on a scripted generator ---------------------------------------------------

TOK = get_agent_task("shop").tokenizer()
LOG_V = math.log(len(TOK))


class ScriptedGenerator:
    """Each round: a ``<python>`` call while the trajectory has made fewer than
    ``calls(prompt)`` calls, else the answer and <eos>. The first token's entropy is chosen
    so that the step entropy (``entropy_tokens=1``) is ``root`` on a trajectory's first
    round and ``after_tool(prompt, n)`` after its n-th result; other tokens have entropy 0.
    A branch is told apart from its parent by a counter in its calls."""

    def __init__(self, calls, root=1.0, after_tool=lambda prompt, n: 1.0):
        self.calls, self.root, self.after_tool = calls, root, after_tool
        self.serial = 0

    def generate(self, prefixes, sampling):
        out = []
        for prefix in prefixes:
            text = TOK.decode(prefix, skip_special_tokens=True)
            prompt = text.split("=")[0] + "="
            done = text.count(RESULT_CLOSE)
            h = self.root if done == 0 else self.after_tool(prompt, done)
            self.serial += 1
            if done < self.calls(prompt):
                piece = f"<python>{self.serial}+0</python>"
                ids = TOK(piece, add_special_tokens=False)["input_ids"]
                reason = "stop"
            else:
                ids = TOK("7", add_special_tokens=False)["input_ids"] + [TOK.eos_token_id]
                reason = "eos"
            if len(ids) > sampling.max_new_tokens:
                ids, reason = ids[:sampling.max_new_tokens], "length"
            out.append(Completion(ids, [-0.5] * len(ids), reason,
                                  [h * LOG_V] + [0.0] * (len(ids) - 1)))
        return out


def engine(generator, max_new_tokens=60, max_tool_calls=3):
    return ToolRollout(generator, TOK, default_toolbox(), max_new_tokens=max_new_tokens,
                       max_tool_calls=max_tool_calls, vocab_size=len(TOK))


def prompts(n):
    return [TOK(f"{i}*2=")["input_ids"] for i in range(n)]


SAMPLING = SamplingParams(max_new_tokens=60, temperature=1.0)


@pytest.mark.parametrize("budget, initial, beam, calls, delta", [
    (8, 4, 2, 1, 0.0), (8, 4, 2, 3, 2.5), (8, 1, 3, 2, 5.0), (16, 8, 2, 3, -5.0),
    (5, 2, 4, 2, 1.0), (8, 8, 2, 2, 5.0), (3, 1, 2, 0, 0.0)])
def test_every_prompt_gets_exactly_its_budget(budget, initial, beam, calls, delta):
    gen = ScriptedGenerator(lambda p: calls if int(p.split("*")[0]) % 2 else 1,
                            root=1.0, after_tool=lambda p, n: 1.0 + delta)
    rule = BranchingRule(beam_size=beam, entropy_tokens=1)
    tree = engine(gen).run(prompts(6), budget, SAMPLING, initial=[initial] * 6, rule=rule,
                           rng=torch.Generator().manual_seed(0))
    assert [len(t) for t in tree.trajectories] == [budget] * 6
    for trajectories in tree.trajectories:
        roots = [t for t in trajectories if t.parent is None]
        branches = [t for t in trajectories if t.parent is not None]
        assert len(roots) >= initial and all(t.finished for t in trajectories)
        assert sum(t.branches for t in trajectories) == len(branches)
        assert [t.id for t in trajectories] == list(range(budget))
    assert len(tree.rows()) == 6 * budget


def test_branches_share_their_prefix_up_to_the_tool_result():
    gen = ScriptedGenerator(lambda p: 2, root=0.0, after_tool=lambda p, n: 5.0)  # P = 1
    tree = engine(gen).run(prompts(2), 6, SAMPLING, initial=[2, 2],
                           rule=BranchingRule(entropy_tokens=1),
                           rng=torch.Generator().manual_seed(0))
    for trajectories in tree.trajectories:
        for branch in (t for t in trajectories if t.parent is not None):
            parent = trajectories[branch.parent]
            shared = next(i for i, (a, b) in enumerate(zip(branch.segments, parent.segments,
                                                           strict=False)) if a is not b)
            assert shared >= 2                            # at least one call and its result
            assert all(a is b for a, b in zip(branch.segments[:shared],
                                               parent.segments[:shared], strict=True))
            assert not branch.segments[shared - 1].trainable          # ends on a result
            assert branch.segments[shared].trainable
            assert branch.completion_ids[:sum(len(s.ids) for s in branch.segments[:shared])] \
                == parent.completion_ids[:sum(len(s.ids) for s in parent.segments[:shared])]
            assert branch.root_entropy == parent.root_entropy == 0.0


@pytest.mark.parametrize("delta", [-2.0, -1.0, 0.0, 0.75, 1.5])
def test_branch_rate_follows_the_entropy_change(delta):
    """One tool call per root, one decision each: the share of decisions that branch is
    clip(0.5 + 0.2 dH, 0, 1) (seeded, 4 binomial standard deviations)."""
    n = 800
    gen = ScriptedGenerator(lambda p: 1, root=2.0, after_tool=lambda p, k: 2.0 + delta)
    tree = engine(gen).run(prompts(n), 2, SAMPLING, initial=[1] * n,
                           rule=BranchingRule(entropy_tokens=1),
                           rng=torch.Generator().manual_seed(1))
    assert sum(tree.decisions) == n
    rate = sum(t[0].branches for t in tree.trajectories) / n
    p = arpo_branch_probability(delta)
    assert abs(rate - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (rate, p)


def test_aepo_consecutive_counter_is_per_prompt_and_resets():
    """Branch probability 1 at l = 0 and 0 at l >= 1 (penalty 1 per round): a prompt whose
    trajectories call a tool every round branches every other round; a prompt that never
    meets a tool never counts."""
    gen = ScriptedGenerator(lambda p: 0 if p.startswith("1*") else 6, root=0.0,
                            after_tool=lambda p, n: 20.0)
    rule = BranchingRule(entropy_tokens=1, penalty=1.0)
    tree = engine(gen, max_new_tokens=200, max_tool_calls=6).run(
        prompts(2), 12, SAMPLING, initial=[1, 1], rule=rule,
        rng=torch.Generator().manual_seed(0))
    assert tree.consecutive_max == [1, 0]
    calling = tree.trajectories[0]
    # The root decides after its results 1..6, in rounds 2..7: it branches in rounds 2, 4
    # and 6 (l = 0) and not in 3, 5, 7 (l = 1). Round 4 branches the root, then its first
    # copy (decisions go in creation order).
    assert calling[0].branches == 3
    assert [calling[i].parent for i in range(1, 4)] == [0, 0, 1]
    arpo = BranchingRule(entropy_tokens=1)
    tree = engine(gen, max_new_tokens=200, max_tool_calls=6).run(
        prompts(2), 12, SAMPLING, initial=[1, 1], rule=arpo,
        rng=torch.Generator().manual_seed(0))
    # ARPO branches at every decision until the budget is full: the tree doubles its
    # deciding trajectories each round (1, 2, 4 -> 8 after round 5 (1 + 1 + 2 + 4), 12 in
    # round 6), so prompt 0 branches in rounds 2..6: five consecutive rounds.
    assert tree.consecutive_max == [5, 0]
    assert tree.trajectories[0][0].branches == 5


def test_tool_call_and_length_budgets():
    gen = ScriptedGenerator(lambda p: 5)
    tree = engine(gen, max_new_tokens=400, max_tool_calls=2).run(prompts(1), 1, SAMPLING)
    (t,) = tree.trajectories[0]
    text = TOK.decode(t.completion_ids, skip_special_tokens=True)
    assert t.tool_calls == 2 and t.tool_errors == 3 and t.finished
    assert text.count("error: the tool-call budget of 2 calls is used up") == 3
    assert all(not s.trainable for s in t.segments[1::2])
    assert t.inserted == sum(len(s.ids) for s in t.segments if not s.trainable)
    short = engine(gen, max_new_tokens=12).run(prompts(1), 1, SAMPLING)
    (t,) = short.trajectories[0]
    assert t.length == 12 and t.finish_reason == "length" and not t.finished


def test_fresh_roots_fill_an_unbranched_budget_one_per_round():
    gen = ScriptedGenerator(lambda p: 0)                  # never a tool call: no branching
    tree = engine(gen).run(prompts(3), 4, SAMPLING, initial=[1, 2, 4],
                           rule=BranchingRule(entropy_tokens=1),
                           rng=torch.Generator().manual_seed(0))
    assert [len(t) for t in tree.trajectories] == [4, 4, 4]
    assert all(t.parent is None for t in tree.rows())
    assert tree.rounds == 4                               # prompt 0: roots in rounds 1..4
    assert tree.decisions == [0, 0, 0]


def test_rollout_arguments_are_checked():
    gen = ScriptedGenerator(lambda p: 1)
    with pytest.raises(ValueError, match=r"initial must give 1\.\.budget=4"):
        engine(gen).run(prompts(2), 4, SAMPLING, initial=[5, 1])
    with pytest.raises(ValueError, match=r"pass a torch\.Generator"):
        engine(gen).run(prompts(2), 4, SAMPLING, rule=BranchingRule())
    with pytest.raises(ValueError, match="beam_size must be >= 2"):
        BranchingRule(beam_size=1)

    class NoEntropy(ScriptedGenerator):
        def generate(self, prefixes, sampling):
            return [Completion(c.ids, c.logprobs, c.finish_reason)
                    for c in super().generate(prefixes, sampling)]

    with pytest.raises(ValueError, match="per-token entropies"):
        engine(NoEntropy(lambda p: 1)).run(prompts(1), 2, SAMPLING, initial=[1],
                                           rule=BranchingRule(),
                                           rng=torch.Generator().manual_seed(0))


# --- the shop task -----------------------------------------------------------------------------

def test_shop_prompts_answers_and_held_out_split():
    task = get_agent_task("shop")
    train = task.train_prompts(400, seed=3)
    assert train == task.train_prompts(400, seed=3) != task.train_prompts(400, seed=4)
    evals = task.eval_prompts()
    assert evals == task.eval_prompts() and len(evals) == task.eval_size
    assert not {e["prompt"] for e in evals} & {e["prompt"] for e in train}
    assert {e["kind"] for e in train} == {"python", "search"}
    for ex in train[:100] + evals[:100]:
        if ex["kind"] == "python":
            a, b = ex["prompt"][:-1].split("*")
            assert int(ex["answer"]) == int(a) * int(b) and 32 <= int(a) <= 99
        else:
            assert packaged_knowledge().search(ex["prompt"][:-1]).endswith(ex["answer"])
        assert len(ex["answer"]) == 4 and len(ex["prompt"]) == 6


def test_shop_rewards():
    task = get_agent_task("shop")
    fns = task.reward_functions
    completions = ["<python>37*48</python><result>1776</result>1776",   # right, tool
                   "1776",                                              # right, no tool
                   "<python>37*48</python><result>1776</result>1777",   # wrong answer
                   "<python>37*48</python><result>1776</result><result>9</result>9",  # made up
                   "<python>37*48</python><result>1776</result>17x6",   # not a number
                   "<python>37*48</python><result>1776</result>1776"]   # right, truncated
    answers = ["1776"] * 6
    finished = [True, True, True, True, True, False]
    assert fns["correct"][0](completions=completions, answer=answers) == \
        [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert fns["format"][0](completions=completions, finished=finished) == \
        [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert fns["format"][1] == 0.1 and task.accuracy_reward == "correct"
    with pytest.raises(ValueError, match="kinds must be"):
        type(task)(kinds=("chess",))


def test_shop_tokenizer_and_warm_up_batch(tmp_path):
    """Every tag is one token; the tokenizer reloads as saved even next to a Qwen2 config
    (transformers would give it Qwen2's byte-level pre-tokenizer, which drops spaces);
    warm-up labels skip the inserted results."""
    import random

    from transformers import Qwen2Config

    from rlhf_fast.tasks.tiny import WarmupConfig
    from rlhf_fast.tasks.tokenizer import load_tokenizer

    task = get_agent_task("shop")
    tok = task.tokenizer()
    text = "<search>apple</search><result>apple costs 2354</result>2354"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) - sum(len(t) - 1 for t in task.toolbox().tags
                                       for _ in range(text.count(t)))
    tok.save_pretrained(tmp_path)
    Qwen2Config(vocab_size=len(tok), hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=1, num_key_value_heads=1).save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.decode(ids) == text and again.padding_side == "left"
    batch = task.demonstration_batch(tok, random.Random(0), WarmupConfig(batch_size=16))
    open_id, close_id = tok.convert_tokens_to_ids(["<result>", "</result>"])
    for row, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        inside = False
        for token, label in zip(row.tolist(), labels.tolist(), strict=True):
            inside = inside or token == open_id
            assert (label == -100) if inside else True
            if token == close_id:
                inside = False
        assert labels[-1] == tok.eos_token_id
