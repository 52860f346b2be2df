"""Shared set-up of the trainer and task tests: the tiny model warmed up on ``sum3`` (and on
the agentic ``shop`` task) once per test session (cached in a temporary directory removed at
exit), run on one CPU thread (the tiny model's matrices are too small to gain from more, and a
busy machine makes extra threads much slower)."""

import atexit
import contextlib
import copy
import functools
import shutil
import tempfile
from pathlib import Path

import torch

from rlhf_fast.tasks import get_task, warmed_up_tiny_model


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.cache
def warm_tiny():
    """(model, tokenizer, cache dir) of the warmed-up tiny model; built once."""
    cache = Path(tempfile.mkdtemp(prefix="rlhf_fast_test_warmup_"))
    atexit.register(shutil.rmtree, cache, True)
    with one_thread():
        model, tok = warmed_up_tiny_model(get_task("sum3"), cache)
    return model, tok, cache


@functools.cache
def warm_shop():
    """(model, tokenizer, cache dir) of the tiny model warmed up on the agentic ``shop`` task
    (it calls tools); built once per session, shared by the agentic and distributed tests."""
    from rlhf_fast.agents import get_agent_task

    cache = Path(tempfile.mkdtemp(prefix="rlhf_fast_test_shop_"))
    atexit.register(shutil.rmtree, cache, True)
    with one_thread():
        model, tok = warmed_up_tiny_model(get_agent_task("shop"), cache)
    return model, tok, cache


def fresh_model():
    """A trainable copy of the warmed-up model and its tokenizer."""
    model, tok, _ = warm_tiny()
    return copy.deepcopy(model), tok
