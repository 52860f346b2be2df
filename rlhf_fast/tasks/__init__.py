"""Embedded tasks, so ``rlhf-fast train`` needs nothing downloaded: verifiable arithmetic
prompts with their reward functions (``arithmetic.py``), a deterministic character-level
tokenizer (``tokenizer.py``) and a tiny Qwen2-shaped model with a short supervised warm-up
(``tiny.py``)."""

from .arithmetic import TASKS, ArithmeticTask, correct_reward, get_task
from .tiny import TinyModelConfig, WarmupConfig, tiny_model, warm_up, warmed_up_tiny_model
from .tokenizer import char_tokenizer

__all__ = ["TASKS", "ArithmeticTask", "TinyModelConfig", "WarmupConfig", "char_tokenizer",
           "correct_reward", "get_task", "tiny_model", "warm_up", "warmed_up_tiny_model"]
