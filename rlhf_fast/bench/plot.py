"""PNG of a report: median time and peak extra memory per case and implementation."""

from __future__ import annotations


def write_plot(report: dict, path: str) -> None:
    """One row of panels per suite: time (ms, log scale) and peak extra memory (MiB)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError("--plot needs matplotlib: pip install 'rlhf-fast[bench]'") from error

    ok = [r for r in report["records"] if r["status"] == "ok"]
    suites = sorted({r["suite"] for r in ok})
    fig, axes = plt.subplots(len(suites), 2, figsize=(12, 3.2 * max(1, len(suites))),
                             squeeze=False)
    for row, suite in enumerate(suites):
        records = [r for r in ok if r["suite"] == suite]
        groups = sorted({(r["label"], r["mode"]) for r in records})
        impls = sorted({r["impl"] for r in records})
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            by_group = {(r["label"], r["mode"]): r for r in records if r["impl"] == impl}
            xs = [i + k * width for i, g in enumerate(groups) if g in by_group]
            picked = [by_group[g] for g in groups if g in by_group]
            axes[row][0].bar(xs, [r["median_ms"] for r in picked], width, label=impl)
            axes[row][1].bar(xs, [r["peak_extra_mib"] for r in picked], width, label=impl)
        for col, (title, unit) in enumerate((("time", "ms"), ("peak extra memory", "MiB"))):
            ax = axes[row][col]
            ax.set_title(f"{suite}: {title}")
            ax.set_ylabel(unit)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
            ax.set_xticklabels([f"{label}\n{mode}" for label, mode in groups], fontsize=7)
            if col == 0:
                ax.set_yscale("log")
            ax.legend(fontsize=7)
    fig.suptitle(f"{report['device']} | torch {report['torch']} | triton {report['triton']} | "
                 f"{report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
