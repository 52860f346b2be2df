"""Data-parallel trainers under ``torchrun``: DDP (the CPU with gloo, or GPUs) and FSDP2
(``torch.distributed.fsdp.fully_shard``, mixed precision), with every batch statistic taken
over the whole global batch, so one update equals the single-process update on that batch.

Launch (one process per GPU; ``rlhf_fast.cli`` sets everything below up)::

    torchrun --nproc-per-node 8 -m rlhf_fast.cli train grpo --model PATH --data-parallel fsdp2

How a step is split over W ranks:

- sizes are global: ``batch_size`` completions per step, ``mini_batch_size`` rows per
  optimiser step, over all ranks; ``micro_batch_size`` is rows per forward on ONE rank.
  ``batch_size / group_size`` prompts must split evenly over the ranks;
- rollouts: every rank draws the same global prompt indices (the prompt generator is seeded
  alike everywhere) and generates its contiguous share, so groups stay whole on one rank and
  rank order is the single-process row order. Sampling is seeded ``seed + rank``;
- statistics: ``DistributedStatistics`` all-reduces every count and sum (loss normalisers,
  logged means) and all-gathers every per-row input of a batch statistic (GRPO group
  baselines, batch whitening, RLOO, DAPO's dynamic-sampling filter, the entropy statistics of
  AEPO / top-entropy configs); a batch whose rows ended up uneven (dynamic sampling) is
  re-dealt so each rank holds ``1 / W`` of it;
- gradients: DDP averages gradients over ranks (FSDP2's reduce-scatter too), so the
  normaliser is multiplied by ``world_scale = 1 / W``: each rank's loss is ``W * (its share of
  the global sum) / global count`` and the average is the global-batch gradient exactly.
  Micro-batches accumulate without communication; only the last one of a mini-batch syncs;
- mini-batches: with several per step, the k-th optimiser step takes the k-th local
  mini-batch of every rank (each rank shuffles its own rows, as verl does); the update equals
  the single-process update over those global mini-batches.

FSDP2 specifics: every decoder layer (the model's ``_no_split_modules``) and the root are
``fully_shard``-ed; the root module's forward returns the backbone's hidden states and owns
the output head, whose weight the fused loss reads after that forward (FSDP2 keeps the root
unsharded from its forward to the end of backward). Generation unshards every parameter for
the duration of ``generate`` (its many small forwards then run without collectives, like
TRL's ``unwrap_model_for_generation``). FSDP2 runs on the CPU with gloo too (tested).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..loss_weights import entropy_advantage, entropy_statistics, top_entropy_mask
from ..ops.linear import linear_token_logprobs
from .batch import RolloutBatch
from .core import Trainer, prompt_rows
from .distributed_checkpoint import load_distributed, save_distributed
from .generation import HFGenerator
from .policy import Policy
from .statistics import BatchStatistics

STRATEGIES = ("auto", "ddp", "fsdp2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DataParallelConfig:
    """How the model is replicated or sharded over the data-parallel ranks."""

    strategy: str = "auto"
    """``ddp`` (DistributedDataParallel: a full replica per rank, gradients all-reduced),
    ``fsdp2`` (``fully_shard``: parameters, gradients and optimiser state sharded) or
    ``auto`` (``fsdp2`` on CUDA, ``ddp`` on the CPU)."""

    param_dtype: str | None = None
    """FSDP2 mixed precision: dtype the unsharded parameters compute in (``bfloat16``,
    ``float16``, ``float32``); None: as stored. The sharded master copy keeps its dtype."""

    reduce_dtype: str | None = "float32"
    """FSDP2: dtype of the gradient reduce-scatter (None: ``param_dtype``)."""

    reshard_after_forward: bool = True
    """FSDP2: free each decoder layer's gathered parameters after its forward (all-gather
    again in backward: less memory, one more all-gather per layer)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"{name} must be None or one of {sorted(DTYPES)}, got "
                                 f"{value!r}")
        if self.strategy == "ddp" and self.param_dtype is not None:
            raise ValueError("param_dtype is FSDP2 mixed precision: use strategy='fsdp2' "
                             "(DDP trains in the model's own dtype)")

    def resolved(self) -> str:
        """``ddp`` or ``fsdp2``."""
        if self.strategy != "auto":
            return self.strategy
        return "fsdp2" if torch.cuda.is_available() else "ddp"


def init_distributed(backend: str | None = None,
                     timeout: timedelta = timedelta(minutes=30)) -> torch.device:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``; ``LOCAL_RANK`` picks the GPU) unless one exists;
    returns this rank's device. backend: ``nccl`` on CUDA, else ``gloo``. ``timeout`` bounds
    every collective: a rank that died or never arrived gives an error, not a hang."""
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                   if k not in os.environ]
        if missing:
            raise RuntimeError(f"no process group and {missing} unset: launch with "
                               "torchrun --nproc-per-node N ... (or call "
                               "torch.distributed.init_process_group first)")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timeout)
    return _device()


def _device(group=None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- statistics over ranks -----------------------------------------------------------------

class DistributedStatistics(BatchStatistics):
    """``BatchStatistics`` over a process group: sums and maxima all-reduced, per-row tensors
    all-gathered in rank order (rows may differ per rank; per-token ``[B, T]`` tensors are
    zero-padded to the largest ``T``), ``world_scale = 1 / W``. Any trainer that takes its
    normalisers and batch statistics from ``self.statistics`` (the policy trainers, a DPO
    trainer through ``count_normalizer``) is data-parallel-exact with it.

    Collectives run on ``device`` (the GPU of an NCCL group; the CPU for gloo); results come
    back on the input's device.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not dist.is_initialized():
            raise RuntimeError("DistributedStatistics needs an initialised process group "
                               "(init_distributed() under torchrun)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.world_scale = 1.0 / self.world_size
        self.device = _device(group)
        self._rows: tuple[int, int] = (0, 0)        # this rank's rows in the last gather
        self._trailing: tuple[int, ...] = ()        # its trailing shape there

    def _reduce(self, x: Tensor, op: dist.ReduceOp) -> Tensor:
        y = x.detach().to(self.device, copy=True)
        dist.all_reduce(y, op=op, group=self.group)
        return y.to(x.device)

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        return self._reduce(x, dist.ReduceOp.SUM)

    def all_reduce_max(self, x: Tensor) -> Tensor:
        return self._reduce(x, dist.ReduceOp.MAX)

    def gather(self, x: Tensor) -> Tensor:
        """Every rank's rows of ``x`` concatenated in rank order; trailing dims padded with
        zeros to the largest over ranks. Two collectives: the shapes, then the data."""
        x = x.detach()
        kind = x.dtype
        data = x.to(self.device, torch.uint8 if kind == torch.bool else kind)
        shape = torch.tensor(x.shape, dtype=torch.int64, device=self.device)
        shapes = [torch.empty_like(shape) for _ in range(self.world_size)]
        dist.all_gather(shapes, shape, group=self.group)
        shapes = [tuple(s.tolist()) for s in shapes]
        if len({len(s) for s in shapes}) != 1:
            raise ValueError(f"gather: the ranks' tensors differ in rank (shapes {shapes})")
        widest = tuple(max(s[d] for s in shapes) for d in range(len(shapes[0])))
        padded = data.new_zeros(widest)
        padded[tuple(slice(0, n) for n in data.shape)] = data
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        offset = sum(s[0] for s in shapes[:self.rank])
        self._rows = (offset, x.shape[0])
        self._trailing = tuple(x.shape[1:])
        out = torch.cat([p[:s[0]] for p, s in zip(parts, shapes, strict=True)])
        return out.to(x.device, kind)

    def local(self, x: Tensor) -> Tensor:
        """This rank's rows of a tensor laid out like the last ``gather``'s result (its
        trailing dims cut back to this rank's)."""
        offset, count = self._rows
        out = x[offset:offset + count]
        cut = tuple(slice(0, n) for n in self._trailing[:out.dim() - 1])
        return out[(slice(None), *cut)] if cut else out

    def normalizer(self, loss_mask: Tensor, config) -> float:
        # B * T with T the global batch's padded width (the widest rank's), as on one process.
        agg = config.aggregation
        if agg.mode == "seq_mean_token_sum_norm" and agg.max_length is None:
            width = self.all_reduce_max(torch.tensor(loss_mask.shape[1], dtype=torch.int64))
            config = config.replace(max_length=int(width))
        return super().normalizer(loss_mask, config)

    def entropy_statistics(self, entropy: Tensor, mask: Tensor,
                           quantile: float | None) -> dict:
        """``rlhf_fast.loss_weights.entropy_statistics`` (mean, unbiased std, the ``1 -
        quantile`` quantile) over the valid tokens of every rank: entropy and mask ``[B, T]``
        are gathered (the quantile needs every value, as TRL gathers them)."""
        return entropy_statistics(self.gather(entropy.float()), self.gather(mask.float()),
                                  quantile)


# --- the model under DDP / FSDP2 ----------------------------------------------------------

class HiddenStates(nn.Module):
    """What DDP / FSDP2 wrap: its forward is the backbone's (``(last_hidden_state,)``), and it
    owns every parameter of ``model``, the output head included, so the head's gradient from
    the fused loss (which reads ``lm_head.weight`` after this forward) is reduced with the
    others."""

    def __init__(self, model: nn.Module, backbone: nn.Module):
        super().__init__()
        self.model = model
        self._backbone = (backbone,)        # a submodule of model: not registered twice

    def forward(self, **kwargs) -> tuple[Tensor]:
        out = self._backbone[0](**kwargs)
        return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0],)


class ParallelBackbone:
    """Stands in for ``Policy.backbone``: calls the DDP / FSDP2-wrapped ``HiddenStates``,
    and decides per grad-enabled forward whether its backward reduces gradients
    (``sync_after``: the last micro-batch of a mini-batch syncs, the others accumulate)."""

    def __init__(self, wrapped: nn.Module, strategy: str):
        self.wrapped, self.strategy = wrapped, strategy
        self._syncs: list[bool] = []

    def sync_after(self, forwards: int) -> None:
        """The next ``forwards`` grad-enabled forwards: no gradient sync, except the last."""
        self._syncs = [False] * (forwards - 1) + [True]

    def __call__(self, **kwargs):
        sync = self._syncs.pop(0) if torch.is_grad_enabled() and self._syncs else True
        if self.strategy == "fsdp2":
            self.wrapped.set_requires_gradient_sync(sync)
            return self.wrapped(**kwargs)
        context = contextlib.nullcontext() if sync else self.wrapped.no_sync()
        with context:
            return self.wrapped(**kwargs)


def _layer_modules(causal_lm: nn.Module) -> list[nn.Module]:
    """The decoder layers (Hugging Face lists their classes in ``_no_split_modules``)."""
    names = set(getattr(causal_lm, "_no_split_modules", None) or ())
    return [m for m in causal_lm.modules() if type(m).__name__ in names]


def broadcast_parameters(model: nn.Module, group=None) -> None:
    """Rank 0's parameters and buffers on every rank (DDP does this itself; FSDP2 shards
    whatever each rank holds, so the ranks must agree first)."""
    device = _device(group)
    for tensor in [*model.parameters(), *model.buffers()]:
        data = tensor.data.to(device)
        dist.broadcast(data, src=dist.get_global_rank(group, 0) if group else 0, group=group)
        if data.data_ptr() != tensor.data.data_ptr():
            tensor.data.copy_(data)


def parallelize(policy: Policy, parallel: DataParallelConfig, *, trainable: bool = True,
                group=None) -> ParallelBackbone | None:
    """Wrap ``policy``'s model for data parallelism in place: ``policy.backbone`` becomes a
    ``ParallelBackbone``. DDP: only a trainable policy is wrapped (a frozen reference runs as
    a plain replica; returns None). FSDP2: the decoder layers and the ``HiddenStates`` root
    are ``fully_shard``-ed (parameters become DTensors: build the optimiser afterwards)."""
    strategy = parallel.resolved()
    if strategy == "ddp" and parallel.param_dtype is not None:
        raise ValueError(f"param_dtype={parallel.param_dtype!r} is FSDP2 mixed precision, but "
                         "the strategy resolved to ddp: use strategy='fsdp2'")
    root = HiddenStates(policy.model, policy.backbone)
    device = _device(group)
    if strategy == "ddp":
        if not trainable:
            return None
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (rotary tables) are identical on every rank: no broadcast before each
        # forward (torch >= 2.13 names the switch forward_sync_buffers).
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
                   else {"broadcast_buffers": False})
        wrapped = DistributedDataParallel(
            root, device_ids=[device.index] if device.type == "cuda" else None,
            process_group=group, **buffers)
    else:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        ranks = dist.get_process_group_ranks(group) if group else list(
            range(dist.get_world_size()))
        mesh = DeviceMesh(device.type, ranks)
        precision = MixedPrecisionPolicy(
            param_dtype=DTYPES.get(parallel.param_dtype),
            reduce_dtype=DTYPES.get(parallel.reduce_dtype))
        for layer in _layer_modules(policy.causal_lm):
            fully_shard(layer, mesh=mesh, mp_policy=precision,
                        reshard_after_forward=parallel.reshard_after_forward)
        fully_shard(root, mesh=mesh, mp_policy=precision)
        wrapped = root
        # FSDP2 picks its root at the first forward through it: make that one ours (a
        # generation that calls the layers directly must not become the root).
        with torch.no_grad():
            one = torch.ones((1, 1), dtype=torch.int64, device=device)
            root(input_ids=one, attention_mask=one, position_ids=one - 1, use_cache=False)
        root.reshard()
    backbone = ParallelBackbone(wrapped, strategy)
    policy.backbone = backbone
    return backbone


def _fsdp_modules(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def unsharded(root: nn.Module, reshard_after_forward: bool = True):
    """Every FSDP2 parameter under ``root`` gathered for the duration (the layers do not
    reshard after each forward), then resharded: ``generate``'s token-by-token forwards run
    without a collective, so ranks that stop at different lengths cannot deadlock.
    ``reshard_after_forward``: the layers' setting to restore."""
    modules = _fsdp_modules(root)
    layers = [m for m in modules if m is not root]     # the root never reshards after forward
    for m in modules:
        m.unshard()
    for m in layers:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in layers:
            m.set_reshard_after_forward(reshard_after_forward, recurse=False)
        for m in modules:
            m.reshard()


class UnshardedGenerator:
    """A ``Generator`` that runs the wrapped one with the FSDP2 policy ``unsharded``."""

    def __init__(self, generator, root: nn.Module, reshard_after_forward: bool = True):
        self.generator, self.root = generator, root
        self.reshard_after_forward = reshard_after_forward

    def generate(self, prefixes, sampling):
        with unsharded(self.root, self.reshard_after_forward):
            return self.generator.generate(prefixes, sampling)


# --- the trainers --------------------------------------------------------------------------

class DataParallelTrainer(Trainer):
    """Mixin in front of any ``Trainer`` subclass (``data_parallel(GRPOTrainer)``): the same
    algorithm over every rank of the default process group, with global statistics.

    Extra keyword argument: ``parallel`` (a ``DataParallelConfig``). The model must be on
    this rank's device (``init_distributed()`` returns it) and identical on every rank
    (rank 0's weights are broadcast first anyway).
    """

    def __init__(self, model, tokenizer, prompts, reward_functions, config=None, *,
                 parallel: DataParallelConfig | None = None, statistics=None, **kwargs):
        if not dist.is_initialized():
            raise RuntimeError(f"{type(self).__name__} needs a process group: run under "
                               "torchrun and call init_distributed() first")
        stats = statistics if statistics is not None else DistributedStatistics()
        if not isinstance(stats, DistributedStatistics):
            raise TypeError("statistics must be a DistributedStatistics")
        self.parallel = parallel or DataParallelConfig()
        self.rank, self.world_size = stats.rank, stats.world_size
        self.is_main_process = self.rank == 0
        config = config if config is not None else self.config_class()
        _check_world_size(config, self.world_size)
        broadcast_parameters(model, stats.group)
        super().__init__(model, tokenizer, prompts, reward_functions, config,
                         statistics=stats, **kwargs)
        c = self.config
        if c.loss.entropy.top_quantile is not None and c.loss.entropy.coef != 0:
            raise ValueError(
                "top_entropy_quantile with entropy_coef != 0 is not supported under data "
                "parallelism: the global top-entropy mask is applied through the advantages, "
                "which cannot mask the entropy bonus")
        torch.manual_seed(c.seed + self.rank)        # each rank samples its own completions
        strategy = self.parallel.resolved()
        names = {id(p): n for n, p in model.named_parameters()}
        self.backbone = parallelize(self.policy, self.parallel, group=stats.group)
        if self.reference is not None and self.reference.policy is not self.policy \
                and strategy == "fsdp2":
            parallelize(self.reference.policy, self.parallel, trainable=False,
                        group=stats.group)
        if strategy == "fsdp2":
            # fully_shard registered DTensor parameters under the same names: the optimiser
            # (no state yet) and the clipping list now hold those.
            sharded = dict(model.named_parameters())
            for group in self.optimizer.param_groups:
                group["params"] = [sharded[names[id(p)]] for p in group["params"]]
            self.parameters = [sharded[names[id(p)]] for p in self.parameters]
            if isinstance(self.generator, HFGenerator):
                self.generator = UnshardedGenerator(self.generator, self.backbone.wrapped,
                                                    self.parallel.reshard_after_forward)

    @property
    def local_mini_batch_size(self) -> int:
        return self.config.mini // self.world_size

    @property
    def _folds_entropy(self) -> bool:
        loss = self.loss_config
        return loss.entropy.advantage_alpha is not None or loss.entropy.top_quantile is not None

    # --- rollout ---------------------------------------------------------------------------

    def sample_prompts(self, n: int) -> list[int]:
        """This rank's contiguous share of the global draw (identical on every rank)."""
        indices = super().sample_prompts(n)
        share = n // self.world_size
        return indices[self.rank * share:(self.rank + 1) * share]

    def collect(self) -> RolloutBatch:
        return self.balance(super().collect())

    def balance(self, batch: RolloutBatch) -> RolloutBatch:
        """The batch re-dealt so each rank holds ``1 / W`` of the rows in rank order (a no-op
        when the ranks already hold equal shares; dynamic sampling keeps uneven ones)."""
        group = self.statistics.group
        sizes: list = [None] * self.world_size
        dist.all_gather_object(sizes, batch.size, group=group)
        if len(set(sizes)) == 1:
            return batch
        batches: list = [None] * self.world_size
        dist.all_gather_object(batches, batch, group=group)
        whole = RolloutBatch.cat([b for b in batches if b.size])
        share = whole.size // self.world_size
        return whole.select(torch.arange(self.rank * share, (self.rank + 1) * share))

    @torch.no_grad()
    def evaluate(self, prompts=None) -> dict[str, float]:
        """Each rank scores a contiguous share of the held-out prompts (all of them when
        there are fewer than ranks); the means are global."""
        rows = prompt_rows(prompts) if prompts is not None else self.eval_prompts
        if rows is None:
            return super().evaluate()     # what else the algorithm evaluates (DPO's pairs)
        if len(rows) >= self.world_size:
            bounds = [len(rows) * k // self.world_size for k in range(self.world_size + 1)]
            rows = rows[bounds[self.rank]:bounds[self.rank + 1]]
        return super().evaluate(rows)

    def prepare_logprobs(self, batch: RolloutBatch) -> None:
        super().prepare_logprobs(batch)
        self._reshard()

    def _reshard(self) -> None:
        # A no-grad forward leaves the FSDP2 root gathered: free it.
        for policy in (self.policy, getattr(self.reference, "policy", None)):
            backbone = getattr(policy, "backbone", None)
            if isinstance(backbone, ParallelBackbone) and backbone.strategy == "fsdp2":
                backbone.wrapped.reshard()

    # --- update ----------------------------------------------------------------------------

    def loss_config_for(self, mini_batch: RolloutBatch):
        config = super().loss_config_for(mini_batch)
        if self._folds_entropy:    # applied to the advantages with global statistics
            config = config.replace(entropy_advantage_alpha=None, top_entropy_quantile=None)
        return config

    def backward(self, mini_batch: RolloutBatch) -> dict[str, float]:
        if self._folds_entropy:
            mini_batch = self.entropy_folded(mini_batch)
        self.backbone.sync_after(math.ceil(mini_batch.size / self.config.micro))
        return super().backward(mini_batch)

    def entropy_folded(self, mini_batch: RolloutBatch) -> RolloutBatch:
        """The mini-batch with AEPO's entropy-aware advantage and the top-entropy mask folded
        into per-token advantages, from entropy statistics over every rank's tokens (the op
        would take them over one call's batch). Exact: both are detached multipliers of the
        advantage (the top-entropy mask zeroes the policy term of the tokens it drops)."""
        loss = self.loss_config
        entropy = self.token_entropy(mini_batch)                             # [b, T]
        mask = mini_batch.loss_mask.float()
        stats = self.statistics.entropy_statistics(entropy, mask, loss.entropy.top_quantile)
        adv = mini_batch.advantages.float()
        adv = adv.unsqueeze(-1).expand(mask.shape) if adv.dim() == 1 else adv
        if loss.entropy.advantage_alpha is not None:
            adv = entropy_advantage(adv, entropy, mask, loss.entropy.advantage_alpha, stats)
        adv = adv * top_entropy_mask(entropy, mask, loss.entropy.top_quantile, stats)
        return replace(mini_batch, advantages=adv.contiguous())

    @torch.no_grad()
    def token_entropy(self, batch: RolloutBatch) -> Tensor:
        """``[b, T]`` float32 entropy of the current (tempered) policy, micro-batch by
        micro-batch."""
        c, policy = self.config, self.policy
        parts = []
        for micro in batch.split(c.micro):
            hidden = policy.completion_hidden(micro)
            _, entropy = linear_token_logprobs(
                hidden, policy.weight, micro.targets.to(hidden.device), bias=policy.bias,
                temperature=c.temperature, return_entropy=True, backend=c.backend)
            parts.append(entropy.detach().float().cpu())
        self._reshard()
        return torch.cat(parts)

    def clip_gradients(self) -> float:
        """The global norm over every rank's shards (FSDP2 gradients are DTensors)."""
        max_norm = self.config.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.parameters,
                                              max_norm if max_norm is not None else math.inf)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # --- checkpoints -----------------------------------------------------------------------

    def save(self, path):
        """Collective: ``path/distributed`` (``torch.distributed.checkpoint``: model and
        optimiser, sharded as they are), ``path/model`` (rank 0: ``save_pretrained`` of the
        full weights, loadable with ``--model PATH``) and ``trainer_state.pt`` (step,
        schedule, every rank's RNG states, algorithm state)."""
        return save_distributed(self, path)

    def load(self, path) -> None:
        """Collective: restore a ``save`` made with the same world size (the model and
        optimiser could be resharded, the per-rank RNG streams could not)."""
        load_distributed(self, path)


def _check_world_size(config, world_size: int) -> None:
    prompts = config.prompts_per_step
    if prompts % world_size:
        raise ValueError(
            f"batch_size / group_size = {prompts} prompts per step do not split over "
            f"{world_size} ranks (each rank generates whole groups): make it a multiple of "
            f"the world size")
    if config.mini % world_size:
        raise ValueError(f"mini_batch_size={config.mini} rows per optimiser step do not "
                         f"split over {world_size} ranks")


_CLASSES: dict[type, type] = {}


def data_parallel(cls: type[Trainer]) -> type[Trainer]:
    """The data-parallel version of trainer class ``cls`` (``DataParallelGRPOTrainer``,
    ...): ``DataParallelTrainer`` in front of it in the method order."""
    if issubclass(cls, DataParallelTrainer):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"DataParallel{cls.__name__}", (DataParallelTrainer, cls),
                             {"__module__": __name__, "__doc__": cls.__doc__})
    return _CLASSES[cls]


def make_data_parallel_trainer(name: str, model, tokenizer, prompts, reward_functions, *,
                               config=None, parallel: DataParallelConfig | None = None,
                               **kwargs) -> Trainer:
    """``registry.make_trainer`` under torchrun: the data-parallel trainer of algorithm
    ``name``."""
    from .registry import algorithm, make_config

    cls, _ = algorithm(name)
    return data_parallel(cls)(model, tokenizer, prompts, reward_functions,
                              config if config is not None else make_config(name),
                              parallel=parallel, **kwargs)
