"""``rlhf-fast``: the command line.

    rlhf-fast bench [--suite logprobs|policy|linear|dpo|gae|all] [--shapes quick|full] [--json PATH]
                    [--markdown PATH]
    rlhf-fast report [--readme README.md] RESULTS.json ...
    rlhf-fast aot   [--arch 80 --arch 90] [--json PATH]
    rlhf-fast isa   [--arch 90 --arch 80] [--vocab V ...] [--dtype bf16 ...] [--json PATH] [--check]
"""

from __future__ import annotations

import argparse
import json
import sys


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-fast", description="rlhf_fast tools")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time the ops against the references on this device")
    b.add_argument("--suite", default="all",
                   choices=["all", "logprobs", "policy", "linear", "dpo", "gae"])
    b.add_argument("--shapes", default="quick", choices=["quick", "full"],
                   help="quick: one shape per suite (CPU: small, e.g. N=512 V=32000; CUDA: "
                        "N=8192 V=151936, dpo 2B*T=16384 H=4096 V=128256); full: logprobs N "
                        "in {8192, 32768} x V in {32000, 128256, 151936, 262144}, policy N in "
                        "{8192, 32768} x V=151936, the linear and dpo grids of their modules")
    b.add_argument("--json", help="write the report (schema in rlhf_fast.bench.runner)")
    b.add_argument("--markdown", help="write the table as Markdown")
    b.add_argument("--plot", help="write a PNG of time and memory per case (matplotlib)")
    b.add_argument("--warmup", type=int, help="warm-up calls per case (CUDA 5, CPU 1)")
    b.add_argument("--reps", type=int, help="timed calls per case (CUDA 20, CPU 3)")
    sub.add_parser("aot", help="compile every kernel for sm_80/sm_90 and report spills",
                   add_help=False)
    sub.add_parser("isa", help="what each row kernel costs on an SM, read from its SASS "
                               "(no GPU): instr/elem, MUFU, widths, registers, model estimate",
                   add_help=False)
    r = sub.add_parser("report", help="regenerate the README's performance section")
    r.add_argument("results", nargs="+", help="benchmark JSON reports")
    r.add_argument("--readme", default="README.md")
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
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
