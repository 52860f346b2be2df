"""One GRPO step on a Hugging Face causal LM, from hidden states: the logits never exist.

    python examples/hf_grpo_step.py                      # a tiny Qwen2 built from a config
    python examples/hf_grpo_step.py --model Qwen/Qwen2.5-0.5B-Instruct --device cuda

What a trainer does each step, in the order it does it:

1. rollout: sample G completions for each prompt (``model.generate``);
2. score them (a toy verifiable reward here) and turn the rewards into group-relative
   advantages (``rlhf_fast.advantages.group_advantages``, GRPO's normalisation), ``[B]``;
3. old-policy and reference-model log-probs under ``no_grad``, from the backbone's hidden
   states and the ``lm_head`` weight (``rlhf_fast.linear_token_logprobs``);
4. ``rlhf_fast.linear_policy_loss`` from the policy's hidden states, ``loss.backward()``, one
   optimiser step.

The shift: the hidden state at position t predicts token t + 1, so the loss takes
``hidden[:, :-1]`` with targets ``input_ids[:, 1:]``, and the mask of target t is the mask of
token t + 1 (completion tokens up to and including the first EOS; no prompt, no padding).
"""

from __future__ import annotations

import argparse
import copy

import torch

import rlhf_fast


def tiny_qwen2(vocab_size: int = 128, seed: int = 0) -> torch.nn.Module:
    """A 2-layer Qwen2 built from a config: random weights, nothing downloaded."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config)


def backbone_hidden(model: torch.nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """The final hidden states ``[B, T, H]`` (after the last norm), without the lm_head: for
    Qwen2 / Llama / Mistral the backbone is ``model.model`` (``model.get_decoder()``)."""
    return model.get_decoder()(input_ids=input_ids,
                               attention_mask=attention_mask).last_hidden_state


def completion_mask(input_ids: torch.Tensor, prompt_length: int, eos_id: int) -> torch.Tensor:
    """bool ``[B, T]``: completion tokens up to and including the first EOS."""
    completion = input_ids[:, prompt_length:]
    after_eos = (completion == eos_id).long().cumsum(-1) - (completion == eos_id).long() > 0
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask[:, prompt_length:] = ~after_eos
    return mask


def toy_reward(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A verifiable reward per sequence ``[B]``: the share of completion tokens that are even."""
    even = (input_ids % 2 == 0) & mask
    return even.sum(-1) / mask.sum(-1).clamp(min=1)


def grpo_step(model: torch.nn.Module, ref_model: torch.nn.Module,
              optimizer: torch.optim.Optimizer, prompts: torch.Tensor, *, group_size: int = 4,
              max_new_tokens: int = 8, eos_id: int = 0, config: str = "grpo") -> dict:
    """One rollout + one update. prompts ``[P, L]`` token ids (same length, no padding).
    Returns the loss, the metrics and the batch, for inspection."""
    # 1. Rollout: G samples per prompt, contiguous per group.
    model.eval()
    with torch.no_grad():
        input_ids = model.generate(prompts.repeat_interleave(group_size, 0), do_sample=True,
                                   max_new_tokens=max_new_tokens,
                                   min_new_tokens=max_new_tokens, pad_token_id=eos_id)
    prompt_length = prompts.shape[1]
    mask = completion_mask(input_ids, prompt_length, eos_id)
    attention_mask = torch.ones_like(input_ids)

    # 2. Rewards -> group-relative advantages, one per sequence: [B].
    rewards = toy_reward(input_ids, mask)
    advantages = rlhf_fast.advantages.group_advantages(rewards, group_size)

    # The shift: hidden[:, t] scores input_ids[:, t + 1].
    targets = input_ids[:, 1:]                                  # [B, T-1]
    loss_mask = mask[:, 1:]                                     # [B, T-1]
    weight = model.get_output_embeddings().weight               # lm_head.weight, [V, H]

    # 3. Old policy (the sampler; here the same weights) and the reference model: no_grad.
    with torch.no_grad():
        old_logprobs = rlhf_fast.linear_token_logprobs(
            backbone_hidden(model, input_ids, attention_mask)[:, :-1], weight, targets)
        ref_hidden = backbone_hidden(ref_model, input_ids, attention_mask)[:, :-1]

    # 4. The loss from hidden states; gradients reach the backbone and lm_head.
    model.train()
    hidden = backbone_hidden(model, input_ids, attention_mask)[:, :-1]   # [B, T-1, H]
    out = rlhf_fast.linear_policy_loss(
        hidden, weight, targets, advantages, loss_mask, old_logprobs=old_logprobs,
        ref_hidden=ref_hidden, ref_weight=ref_model.get_output_embeddings().weight,
        config=config)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    return {"loss": out.loss.detach(), "metrics": out.metrics, "input_ids": input_ids,
            "mask": loss_mask, "targets": targets, "advantages": advantages,
            "old_logprobs": old_logprobs, "rewards": rewards}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a Hugging Face model name or path (default: a tiny "
                                        "Qwen2 built from a config, nothing downloaded)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="completion length")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and sampling")
    args = parser.parse_args(argv)

    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.bfloat16)
    else:
        model = tiny_qwen2(seed=args.seed)
    model.to(args.device)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(1, model.config.vocab_size, (args.prompts, 6), generator=g)
    torch.manual_seed(args.seed)
    step = grpo_step(model, ref_model, optimizer, prompts.to(args.device),
                     group_size=args.group_size, max_new_tokens=args.max_new_tokens)
    metrics = ", ".join(f"{k} {float(v):.4g}" for k, v in step["metrics"].items())
    print(f"loss {float(step['loss']):.6f}; reward mean {float(step['rewards'].mean()):.3f}; "
          f"{metrics}")
    return step


if __name__ == "__main__":
    main()
