"""Bytes each rank sends through ``torch.distributed`` for one step of the vocabulary-parallel
ops (gloo on the CPU; the volume does not depend on the device):

    torchrun --nproc-per-node 2 benchmarks/vocab_parallel_volume.py

Every collective of ``torch.distributed`` is wrapped to add up the bytes of the tensors it
sends; the results are in ``benchmarks/NOTES.md`` (Vocabulary-parallel ops)."""

from contextlib import contextmanager

import torch
import torch.distributed as dist

from rlhf_fast import dpo_loss, linear_policy_loss, policy_loss

B, T, V, H = 8, 512, 32000, 64
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all_single")


@contextmanager
def counted(sent: list[int]):
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(fn):
        def call(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            sent.append(sum(t.numel() * t.element_size() for t in tensors[-1:]))
            return fn(*args, **kwargs)
        return call

    for name, fn in originals.items():
        setattr(dist, name, wrap(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    widths = [V // world + (r < V % world) for r in range(world)]
    cols = slice(sum(widths[:rank]), sum(widths[:rank + 1]))
    torch.manual_seed(0)
    logits = torch.randn(B, T, V)[..., cols].clone().requires_grad_()
    targets = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    advantages = torch.randn(B)
    policy_loss(logits, targets, advantages, mask, config="dapo", process_group=group)  # layout
    forward, backward, dpo, linear = [], [], [], []
    with counted(forward):
        out = policy_loss(logits, targets, advantages, mask, config="dapo", process_group=group)
    with counted(backward):
        out.loss.backward()
    with counted(dpo):
        dpo_loss(logits, targets, mask, reference_free=True, process_group=group).loss.backward()
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H)[cols].clone().requires_grad_()
    with counted(linear):
        linear_policy_loss(hidden, weight, targets, advantages, mask, config="dapo",
                           process_group=group).loss.backward()
    if rank == 0:
        n = B * T
        print(f"N = {n} rows, V = {V} over {world} ranks, bytes sent per rank: "
              f"policy_loss forward {sum(forward)} ({sum(forward) / n:g} a row), backward "
              f"{sum(backward)}; dpo_loss forward + backward {sum(dpo)} ({sum(dpo) / n:g} a "
              f"row); linear_policy_loss (H = {H}) forward + backward {sum(linear)} "
              f"({n * H * 4} of them dL/dhidden)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
