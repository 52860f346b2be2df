"""Peak memory of one GRPO / DPO training step: TRL's own ``compute_loss`` vs TRL + rlhf_fast.

Usage (each measurement runs in a fresh child process)::

    python benchmarks/trl_memory.py [--vocab 65536] [--hidden 256] [--batch 8]
                                    [--prompt 32] [--completion 512] [--device cpu]

A 2-layer Qwen2 with the given vocabulary is built from a config (float32) and saved to a
temporary directory; a ``GRPOTrainer`` (loss_type "dapo", on-policy) and a ``DPOTrainer``
(sigmoid) are built on it, and one ``compute_loss(...).backward()`` on a synthetic batch is
measured with ``rlhf_fast.bench.measure.peak_extra_mib`` (CUDA: max allocated; CPU: the
resident set's high-water mark above the level before the step). The model, optimizer-free
trainer and batch exist before the measurement, so the number is what the step itself adds:
activations, the head's logits (or their chunks) and the gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD_VARIANTS = ("grpo:trl", "grpo:rlhf_fast", "dpo:trl", "dpo:rlhf_fast")


def _build(path: str, vocab: int, hidden: int) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(61)}}
    raw = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0,
        eos_token_id=1)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def _child(variant: str, path: str, a: argparse.Namespace) -> float:
    import datasets
    import torch
    import transformers
    import trl

    from rlhf_fast.bench.measure import peak_extra_mib
    from rlhf_fast.integrations import trl as fused

    loss, which = variant.split(":")
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(path)
    common = dict(output_dir=tempfile.mkdtemp(), report_to=[], save_strategy="no",
                  use_cpu=a.device == "cpu", bf16=False, gradient_checkpointing=False)
    gen = torch.Generator().manual_seed(0)
    device = torch.device(a.device)
    if loss == "grpo":
        cls = fused.GRPOTrainer if which == "rlhf_fast" else trl.GRPOTrainer
        trainer = cls(model=path, reward_funcs=[lambda completions, **k: [0.0] * len(
            completions)], processing_class=tokenizer,
            args=trl.GRPOConfig(per_device_train_batch_size=a.batch, num_generations=a.batch,
                                max_completion_length=a.completion, loss_type="dapo",
                                **common),
            train_dataset=datasets.Dataset.from_dict({"prompt": ["w1 w2"] * a.batch}))
        trainer.current_gradient_accumulation_steps = 1
        ids = torch.randint(3, a.vocab, (a.batch, a.prompt + a.completion), generator=gen)
        inputs = {"prompt_ids": ids[:, :a.prompt], "completion_ids": ids[:, a.prompt:],
                  "prompt_mask": torch.ones(a.batch, a.prompt, dtype=torch.long),
                  "completion_mask": torch.ones(a.batch, a.completion, dtype=torch.long),
                  "advantages": torch.randn(a.batch, generator=gen),
                  "num_items_in_batch": torch.tensor(float(a.batch * a.completion))}
    else:
        cls = fused.DPOTrainer if which == "rlhf_fast" else trl.DPOTrainer
        trainer = cls(model=path, processing_class=tokenizer,
                      args=trl.DPOConfig(per_device_train_batch_size=a.batch,
                                         max_length=a.prompt + a.completion, **common),
                      train_dataset=datasets.Dataset.from_dict(
                          {"prompt": ["w1"], "chosen": [" w2"], "rejected": [" w3"]}))
        length = a.prompt + a.completion
        ids = torch.randint(3, a.vocab, (2 * a.batch, length), generator=gen)
        completion = torch.zeros(2 * a.batch, length, dtype=torch.long)
        completion[:, a.prompt:] = 1
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "completion_mask": completion}
    inputs = {k: v.to(device) for k, v in inputs.items()}
    model = trainer.model
    model.train()

    def step():
        trainer.compute_loss(model, dict(inputs)).backward()

    return peak_extra_mib(step, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="completions (GRPO) / pairs (DPO)")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--completion", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", choices=CHILD_VARIANTS)
    p.add_argument("--model-dir")
    a = p.parse_args()
    if a.child:
        print(json.dumps({"peak_mib": _child(a.child, a.model_dir, a)}))
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as path:
        _build(path, a.vocab, a.hidden)
        rows = {}
        for variant in CHILD_VARIANTS:
            cmd = [sys.executable, __file__, "--child", variant, "--model-dir", path,
                   *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
            rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    logits = a.batch * a.completion * a.vocab * 4 / 2**20
    print(f"one training step, peak extra memory ({a.device}; Qwen2 2 layers, H={a.hidden}, "
          f"V={a.vocab}, float32; {a.batch} x ({a.prompt} + {a.completion}) tokens; "
          f"the completion logits alone would be {logits:.0f} MiB per {a.batch} sequences)")
    print("| loss | TRL | TRL + rlhf_fast |")
    print("|---|---|---|")
    for loss in ("grpo", "dpo"):
        print(f"| {loss} | {rows[f'{loss}:trl']:.0f} MiB | {rows[f'{loss}:rlhf_fast']:.0f} MiB |")


if __name__ == "__main__":
    main()
