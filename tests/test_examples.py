"""The examples in ``examples/`` run, on tiny Hugging Face models built from configs, and
compute what plain PyTorch on the materialised logits computes. transformers is in the
[test] extra, so nothing here skips."""

import copy
import importlib.util
import pathlib
import runpy
import sys

import torch
from numerics import assert_grad_close

from rlhf_fast import PolicyLossConfig, reference

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_grpo_step_runs_as_a_script(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["hf_grpo_step.py", "--group-size", "2"])
    runpy.run_path(str(EXAMPLES / "hf_grpo_step.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert out.startswith("loss ") and "kl_mean" in out


def test_hf_grpo_step_matches_plain_pytorch_on_the_logits():
    example = load("hf_grpo_step")
    model = example.tiny_qwen2(seed=1)
    ref_model = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():   # a reference model that differs from the policy: KL > 0
        for p in ref_model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    # lr = 0: the step leaves the weights as they were and the gradients in .grad.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    prompts = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)
    step = example.grpo_step(model, ref_model, optimizer, prompts, group_size=3,
                             max_new_tokens=6, eos_id=7)
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert step["mask"].any() and not step["mask"][:, :4].any(), "prompt tokens are masked"
    assert step["advantages"].shape == (6,)

    # The same loss from the full logits, differentiated by autograd.
    plain = copy.deepcopy(model)
    plain.zero_grad(set_to_none=True)
    ids, targets, mask = step["input_ids"], step["targets"], step["mask"]
    logits = plain(input_ids=ids).logits[:, :-1]
    with torch.no_grad():
        ref_logprobs = reference.token_logprobs(ref_model(input_ids=ids).logits[:, :-1],
                                                targets)
        old_logprobs = reference.token_logprobs(logits, targets)
    torch.testing.assert_close(step["old_logprobs"], old_logprobs, rtol=0, atol=1e-5)
    loss, *_, metrics = reference.policy_loss(
        logits, targets, step["advantages"], mask, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, config=PolicyLossConfig.preset("grpo"))
    loss.backward()
    assert abs(step["loss"].item() - loss.item()) <= 1e-5 * max(1.0, abs(loss.item()))
    assert float(step["metrics"]["kl_mean"]) > 0
    torch.testing.assert_close(step["metrics"]["kl_mean"], metrics["kl_mean"], rtol=1e-4,
                               atol=1e-7)
    for name, p in plain.named_parameters():
        assert_grad_close(ours[name], p.grad, torch.float32)
