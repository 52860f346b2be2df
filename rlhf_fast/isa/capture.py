"""Record the exact kernel specialisations the launchers produce, without a GPU.

A stand-in Triton driver reports a CUDA target (``sm_90`` or ``sm_80``), and Triton's
``jit_cache_hook`` (``triton.knobs.runtime``) records every launch's specialisation (argument
types, divisibility hints, compile-time switches, ``num_warps``) and tells Triton to skip it, so
nothing is compiled or run. The public ops are then called with CPU tensors of the target shapes
(``torch.empty``: their pages are never touched), exactly as a user would call them on a GPU:
the launchers' choices (block sizes, paths, switches) are what gets recorded, not a hand-made
list. ``compile_variant`` (``rlhf_fast.isa.sass``) then compiles each recorded variant.

The interpreter must be off (``TRITON_INTERPRET`` unset when Triton is first imported): it
replaces ``@triton.jit`` functions with Python ones.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

BATCH, SEQ_LEN = 2, 1024
"""Shape of the stand-in batch. Only V, the dtype and the strides (T * V, V) enter a
specialisation; the number of rows is the grid, which no compile sees."""


@dataclass(frozen=True)
class Use:
    """One op call that launched a kernel: ``op`` names the call (``"policy_loss[dapo]"``),
    ``dtype`` the logits' dtype (``"bf16"``), ``vocab`` V."""

    op: str
    dtype: str
    vocab: int


@dataclass
class Variant:
    """One specialisation of one kernel, as a launch requested it.

    kernel: ``module:name``; signature: argument name -> Triton type (``"constexpr"`` for
    compile-time arguments); constexprs / attrs: as Triton's ``ASTSource`` takes them;
    options: the launch's compile options (``num_warps``, ``num_stages``, ``maxnreg``, ...);
    uses: the op calls that launched it (one variant can serve several ops and vocabularies).
    """

    fn: object
    kernel: str
    signature: dict[str, str]
    constexprs: dict
    attrs: dict
    options: dict
    uses: list[Use] = field(default_factory=list)

    @property
    def key(self) -> str:
        return json.dumps([self.kernel, self.signature, sorted(map(repr, self.constexprs.items())),
                           sorted(map(repr, self.attrs.items())), sorted(self.options.items())])

    def signature_names(self) -> list[str]:
        return list(self.signature)

    def constexpr(self, name: str) -> object:
        """Value of the compile-time argument ``name`` (None when it is not one)."""
        names = self.signature_names()
        for path, value in self.constexprs.items():
            if names[path[0]] == name:
                return getattr(value, "value", value)
        return None

    def with_constexpr(self, name: str, value: object) -> Variant:
        """A copy of this variant with the compile-time argument ``name`` set to ``value``."""
        index = self.signature_names().index(name)
        constexprs = {p: (value if p[0] == index else v) for p, v in self.constexprs.items()}
        return Variant(self.fn, self.kernel, dict(self.signature), constexprs, dict(self.attrs),
                       dict(self.options), [])

    @property
    def row_dtype(self) -> str | None:
        """Triton element type of the logits the kernel sweeps (None for other kernels)."""
        ty = self.signature.get("logits_ptr")
        return ty[1:] if ty else None


COMPILE_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")
"""The launch options that change the generated code and are target-independent."""


class StandInDriver:
    """Answers Triton's questions about the device as a CUDA GPU of compute capability
    ``arch`` would, so that launchers specialise for it; it cannot launch anything."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def _rlhf_kernels() -> list:
    """Every ``@triton.jit`` kernel of the package (their launch caches are reset around a
    capture, so the stand-in target never leaks into real launches)."""
    import importlib
    import pkgutil

    import triton

    from .. import kernels

    found = []
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        found += [v for v in vars(module).values() if isinstance(v, triton.runtime.JITFunction)]
    return found


class Recorder:
    """``recorder(use, thunk)`` calls ``thunk`` (which launches kernels through the public
    ops) and files what it launched under ``use``; ``variants`` holds each distinct
    specialisation once, with every use that launched it."""

    def __init__(self) -> None:
        self.launched: list[Variant] = []
        self._by_key: dict[str, Variant] = {}

    @property
    def variants(self) -> list[Variant]:
        return list(self._by_key.values())

    def hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):
        """Triton's ``jit_cache_hook``: record the launch and return True (skip it)."""
        options = json.loads(compile["specialization_data"])["options"]
        jit = fn.jit_function
        self.launched.append(Variant(
            jit, f"{jit.fn.__module__}:{jit.fn.__name__}",
            signature=dict(compile["signature"]), constexprs=dict(compile["constants"]),
            attrs=dict(compile["configs"][0]),
            options={k: options[k] for k in COMPILE_OPTIONS if options.get(k) is not None}))
        return True

    def __call__(self, use: Use, thunk: Callable[[], object]) -> None:
        start = len(self.launched)
        thunk()
        if len(self.launched) == start:
            raise RuntimeError(f"{use}: no kernel was launched")
        for v in self.launched[start:]:
            v = self._by_key.setdefault(v.key, v)
            if use not in v.uses:
                v.uses.append(use)


@contextlib.contextmanager
def capturing(arch: int) -> Iterator[Recorder]:
    """Context in which launches are recorded for target ``sm_<arch>``, not run."""
    import triton
    from triton import knobs

    from .. import backend as backend_module

    if backend_module.triton_interpreted():
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    recorder = Recorder()
    kernels = _rlhf_kernels()
    saved_hook = knobs.runtime.jit_cache_hook
    saved_interpreted = backend_module.triton_interpreted
    config = triton.runtime.driver
    # The driver in use before (None when none was created yet, as on a machine without GPU:
    # Triton's reset_active() would then fail looking for one).
    saved_driver = config.__dict__.get("_active")
    for k in kernels:
        k.device_caches.clear()
    config.set_active(StandInDriver(arch))
    knobs.runtime.jit_cache_hook = recorder.hook
    # CPU tensors stand in for device tensors: the ops take their Triton path.
    backend_module.triton_interpreted = lambda: True
    try:
        yield recorder
    finally:
        knobs.runtime.jit_cache_hook = saved_hook
        backend_module.triton_interpreted = saved_interpreted
        if saved_driver is not None:
            config.set_active(saved_driver)
        else:
            config.__dict__["_active"] = None
        for k in kernels:
            k.device_caches.clear()


def capture(arch: int, vocab_sizes: tuple[int, ...], dtypes: tuple[str, ...],
            with_gae: bool = True) -> list[Variant]:
    """Every specialisation the public ops launch for these vocabularies and logits dtypes."""
    from .launch_plan import launch_every_op, launch_gae

    with capturing(arch) as record:
        for dtype in dtypes:
            for vocab in vocab_sizes:
                launch_every_op(record, DTYPES[dtype], vocab)
        if with_gae:
            launch_gae(record)
    return record.variants
