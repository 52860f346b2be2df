"""The embedded tasks: tokenizer, prompts and rewards, the tiny model and its cached warm-up."""

import pytest
import torch
from tiny_setup import one_thread, warm_tiny

from rlhf_fast.tasks import (
    TASKS,
    ArithmeticTask,
    TinyModelConfig,
    WarmupConfig,
    char_tokenizer,
    correct_reward,
    get_task,
    tiny_model,
    warmed_up_tiny_model,
)
from rlhf_fast.tasks.arithmetic import held_out


@pytest.fixture(scope="module")
def tiny_warm():
    return warm_tiny()


def test_tokenizer_round_trip_and_reload(tmp_path):
    from transformers import AutoTokenizer

    tok = char_tokenizer()
    ids = tok("12+3=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 6          # <bos> + one id a char
    assert tok.decode(ids, skip_special_tokens=True) == "12+3="
    assert tok.decode(tok("7", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                      skip_special_tokens=True) == "7"
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("9*8-7=")["input_ids"] == tok("9*8-7=")["input_ids"]
    assert again.padding_side == "left" and len(again) == len(tok)
    with pytest.raises(ValueError, match="repeated"):
        char_tokenizer("11")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_prompts_are_deterministic_correct_and_held_out_is_disjoint(name):
    task = get_task(name)
    train = task.train_prompts(500, seed=3)
    assert train == task.train_prompts(500, seed=3)
    assert train != task.train_prompts(500, seed=4)
    evals = task.eval_prompts()
    assert evals == task.eval_prompts() and len(evals) == task.eval_size
    for ex in train[:50] + evals[:50]:
        assert eval(ex["prompt"][:-1]) == int(ex["answer"])      # left to right = Python here
        assert len(ex["prompt"]) <= task.max_prompt_chars
        assert len(ex["answer"].lstrip("-")) <= task.answer_digits

    def operands(prompt):
        return [int(x) for x in prompt[:-1].replace("-", "+").replace("*", "+").split("+")]
    assert not any(held_out(operands(ex["prompt"])) for ex in train)
    assert all(held_out(operands(ex["prompt"])) for ex in evals)


def test_rewards():
    task = get_task("mixed3")
    completions = ["16", "-3", "16x", "", "12345"]
    assert correct_reward(completions, answer=["16", "-3", "16", "1", "12345"]) == \
        [1.0, 1.0, 0.0, 0.0, 1.0]
    assert task.format_reward(completions, finished=[True, True, True, True, True]) == \
        [1.0, 1.0, 0.0, 0.0, 0.0]                                 # 12345: too many digits
    assert task.format_reward(["16"], finished=[False]) == [0.0]  # cut at the length limit
    assert set(task.reward_functions) == {"correct", "format"}
    with pytest.raises(ValueError, match="unknown task"):
        get_task("countdown9")
    with pytest.raises(ValueError, match="operators"):
        ArithmeticTask(operators="/")


def test_tiny_model_shape():
    tok = char_tokenizer()
    model = tiny_model(tok, TinyModelConfig())
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 < n < 1_000_000                                # a few hundred K
    assert model.lm_head.weight is model.model.embed_tokens.weight   # tied
    assert type(model).__name__ == "Qwen2ForCausalLM"


def test_warm_up_is_cached_deterministic_and_learns(tiny_warm, tmp_path):
    """The session's warm-up is cached: loading it again gives the same weights. It learned
    to add (the answer before any restatement is right far more often than an untrained
    model's) and, as its demonstrations did, it mostly restates the result."""
    model, tok, cache = tiny_warm
    again, _ = warmed_up_tiny_model(get_task("sum3"), cache)
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert len(list(cache.iterdir())) == 1

    def greedy_accuracy(m):
        task = get_task("sum3")
        rows = task.eval_prompts()[:100]
        enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = m.generate(**enc, max_new_tokens=task.max_new_tokens, do_sample=False)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        right = sum(t.split("=")[0] == r["answer"] for t, r in zip(texts, rows, strict=True))
        restated = sum("=" in t for t in texts)
        return right / len(rows), restated / len(rows)

    with one_thread():
        accuracy, restated = greedy_accuracy(model)
        assert accuracy > 0.3 and restated > 0.5
        assert greedy_accuracy(tiny_model(tok))[0] < 0.1


def test_warm_up_cache_key_depends_on_the_settings(tmp_path):
    from rlhf_fast.tasks.tiny import _cache_key

    task = get_task("sum3")
    base = _cache_key(task, TinyModelConfig(), WarmupConfig())
    assert base == _cache_key(task, TinyModelConfig(), WarmupConfig())
    assert base != _cache_key(task, TinyModelConfig(), WarmupConfig(steps=7))
    assert base != _cache_key(get_task("add2"), TinyModelConfig(), WarmupConfig())
