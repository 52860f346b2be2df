"""``rlhf-fast``: the command line.

    rlhf-fast --version
    rlhf-fast bench [--suite logprobs|policy|linear|dpo|gae|train|all] [--shapes quick|full]
                    [--json PATH] [--markdown PATH] [--plot PATH] [--warmup N] [--reps N]
    rlhf-fast report [--readme README.md] RESULTS.json ...
    rlhf-fast aot   [--arch 80 --arch 90] [--json PATH]
    rlhf-fast train ALGO [--model tiny|PATH] [--task NAME] [--steps N] [--out DIR]
                    [--loss fused|reference] ...   (rlhf_fast.trainers.cli)
    rlhf-fast isa   [--arch 90 --arch 80] [--vocab V ...] [--dtype bf16 ...] [--json PATH]
                    [--check]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys

from . import __version__
from .bench.suites import SUITES

OPTIONAL_OUTPUTS = {"plot": ("matplotlib", "pip install matplotlib  (or: pip install "
                                           "'rlhf-fast[bench]')")}
"""Output options that need an optional package: option -> (module, how to install it)."""


def version_text() -> str:
    from importlib import metadata

    import torch

    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = "not installed"
    return (f"rlhf-fast {__version__} (torch {torch.__version__}, triton {triton}, "
            f"python {platform.python_version()})")


def output_problem(args: argparse.Namespace) -> str | None:
    """Why an output of ``rlhf-fast bench`` could not be written, found before a run of
    minutes: a missing optional package (``--plot`` needs matplotlib) or output folder."""
    for option, (module, install) in OPTIONAL_OUTPUTS.items():
        if getattr(args, option) and importlib.util.find_spec(module) is None:
            return f"--{option} needs {module}, which is not installed: {install}"
    for option in ("json", "markdown", "plot"):
        path = getattr(args, option)
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            return f"--{option} {path}: the folder {folder} does not exist"
    return None


def bench(args: argparse.Namespace) -> int:
    from .bench import runner

    suites = list(runner.SUITES) if args.suite == "all" else [args.suite]
    report = runner.run(suites, shapes=args.shapes, warmup=args.warmup, reps=args.reps)
    print(runner.format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(runner.to_markdown(report))
    if args.plot:
        from .bench.plot import write_plot
        write_plot(report, args.plot)
    return 1 if any(r["status"] == "error" for r in report["records"]) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-fast", description="rlhf_fast tools")
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print the versions of rlhf-fast, torch, triton and python")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    b = sub.add_parser("bench", help="time the ops against the references on this device",
                       description="Time every op against its float32 reference (and the "
                                   "peers when installed) on this device, with the copy "
                                   "bandwidth and matmul rate measured in the same run.")
    b.add_argument("--suite", default="all", choices=["all", *SUITES],
                   help="which suite to run (default: all): logprobs = token_logprobs; "
                        "policy = policy_loss; linear = linear_policy_loss / "
                        "linear_token_logprobs from hidden states; dpo = dpo_loss / "
                        "linear_dpo_loss; gae = rlhf_fast.gae.gae; train = one GRPO and one PPO "
                        "training step of a Hugging Face model, fused vs reference loss")
    b.add_argument("--shapes", default="quick", choices=["quick", "full", "tiny"],
                   help="quick (default): one shape per suite (CPU: small, e.g. N=512 "
                        "V=32000; CUDA: N=8192 V=151936, dpo 2B*T=16384 H=4096 V=128256); "
                        "full: logprobs N in {8192, 32768} x V in {32000, 128256, 151936, "
                        "262144}, policy N in {8192, 32768} x V=151936, the linear and dpo "
                        "grids of their modules; tiny: toy shapes that check the harness in "
                        "seconds (timings meaningless)")
    b.add_argument("--json", metavar="PATH",
                   help="write the report (schema in rlhf_fast.bench.schema)")
    b.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    b.add_argument("--plot", metavar="PATH",
                   help="write a PNG of time and memory per case (needs matplotlib; checked "
                        "before the run)")
    b.add_argument("--warmup", type=int, metavar="N",
                   help="warm-up calls per case (default: CUDA 5, CPU 1)")
    b.add_argument("--reps", type=int, metavar="N",
                   help="timed calls per case, of which the median is reported (default: "
                        "CUDA 20, CPU 3)")
    sub.add_parser("aot", help="compile every kernel for sm_80/sm_90 and report register "
                               "spills (options: rlhf-fast aot --help)", add_help=False)
    sub.add_parser("isa", help="what each row kernel costs on an SM, read from its SASS "
                               "(no GPU): instr/elem, MUFU, widths, registers, model estimate "
                               "(options: rlhf-fast isa --help)", add_help=False)
    r = sub.add_parser("report", help="regenerate the README's performance section",
                       description="Rewrite the README's performance section from "
                                   "committed benchmark reports.")
    r.add_argument("results", nargs="+", metavar="RESULTS.json",
                   help="benchmark JSON reports (rlhf-fast bench --json)")
    r.add_argument("--readme", default="README.md", metavar="PATH",
                   help="the README to update (default: README.md)")
    from .trainers.cli import add_parser as add_train_parser
    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Triton 3.9 warns on every compile while this is unset; 1 is its default (fma on).
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "aot":
        from .aot import main as aot_main
        return aot_main(rest)
    if args.command == "isa":
        from .isa.report import main as isa_main
        return isa_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "report":
        from .bench.readme import update_readme
        changed = update_readme(args.readme, args.results)
        print(f"{args.readme}: {'updated' if changed else 'already up to date'}")
        return 0
    if args.command == "train":
        from .trainers.cli import run as train
        return train(args)
    problem = output_problem(args)
    if problem:
        print(f"rlhf-fast bench: error: {problem} (nothing was run)", file=sys.stderr)
        return 2
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
