"""Mutation testing of the formula modules with cosmic-ray (not part of CI: it is slow).

    nice -n 15 python benchmarks/mutation/run.py [--modules NAME ...] [--source REV]
                                                  [--label LABEL] [--out DIR]

What it does, per module of ``MODULES`` (host-side formula modules and the kernels' device
helpers):

1. copies the repository (the working tree, or the commit ``--source``, with this folder
   taken from the working tree) into a scratch folder, so the checkout is never mutated;
   ``rlhf_fast/kernels`` there is a link to ``kernels/`` and the copy is first on
   ``PYTHONPATH``, so the tests import the copy (checked before any mutant runs);
2. ``cosmic-ray init`` lists every mutant; the mutants that are not formula changes are
   marked skipped (see ``selection.py``: a short list of operators, no type annotations, no
   error-message text, no AOT-compile specs);
3. checks that the module's test selection passes unmutated, then ``cosmic-ray exec`` runs
   it once per mutant through a fork server (``server.py``: torch and pytest imported once,
   ``rlhf_fast`` imported afresh per mutant), ``-x`` so a mutant stops at its first failure;
4. writes ``DIR/LABEL.json`` (every mutant and its outcome) and ``DIR/LABEL.md`` (score
   per module and the surviving mutants). Survivors listed as equivalent in
   ``docs/testing.md`` (section "Equivalent mutants") leave the denominator.

The kernels' modules are listed by path: a rewritten kernel file is picked up by the next
run as it is. Test selections use the torch backend where the module is host code; the
device helpers run under the Triton interpreter (set by ``tests/conftest.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from selection import equivalent_keys, mutant_key, skip_reason  # noqa: E402

HOST = ["-k", "not triton and not dtype1"]
"""Host modules run on the torch backend, float32 only (bf16 cases test the kernels)."""
DEVICE = ["-k", "not torch"]
"""Device helpers run under the Triton interpreter."""
POLICY = ["tests/test_policy_mechanisms.py", "tests/test_policy_loss.py::test_fields",
          "tests/test_policy_loss.py::test_kl_estimators",
          "tests/test_policy_loss.py::test_aggregations",
          "tests/test_policy_loss.py::test_rollout_corrections",
          "tests/test_policy_loss.py::test_on_policy"]
"""The original policy-loss tests, without the hypothesis draws and the preset sweep
(``test_preset_matches_reference``: 160 cases that only repeat, preset by preset, what the
field-by-field tests check; a surviving mutant pays for every test of its selection)."""

MODULES: dict[str, dict] = {
    # path: pytest arguments (files that do not exist in the copy are dropped, so an older
    # --source runs its own tests), functions whose mutants are not formula changes, and
    # the per-mutant timeout in seconds. New, targeted tests come first: -x stops a killed
    # mutant at its first failure.
    "rlhf_fast/config.py": {"tests": [
        "tests/test_config_parts.py", "tests/test_oracle_config.py",
        "tests/test_policy_mechanisms.py::TestBadInput",
        "tests/test_policy_paths.py::test_path_choice", *HOST]},
    "rlhf_fast/policy_config_parts.py": {"tests": [
        "tests/test_config_parts.py", "tests/test_oracle_config.py",
        "tests/test_policy_mechanisms.py::TestBadInput", *HOST]},
    "rlhf_fast/policy_coefficients.py": {"tests": [
        "tests/test_oracle_coefficients.py", "tests/test_oracle_policy.py", *POLICY, *HOST]},
    "rlhf_fast/loss_weights.py": {"tests": [
        "tests/test_oracle_weights.py", "tests/test_oracle_coefficients.py",
        "tests/test_oracle_policy.py", *POLICY,
        "tests/test_value_kl_shaping.py", *HOST]},
    "rlhf_fast/preference_coefficients.py": {"tests": [
        "tests/test_oracle_preference.py", "tests/test_dpo.py", "tests/test_linear_dpo.py",
        "-k", "not triton and not dtype1 and not peak_memory and not training"]},
    "rlhf_fast/preference_config.py": {"tests": [
        "tests/test_oracle_preference.py", "tests/test_dpo.py",
        "-k", "not triton and not dtype1 and not training"]},
    "rlhf_fast/advantages.py": {"tests": [
        "tests/test_oracle_advantages.py", "tests/test_advantages.py", *HOST]},
    "rlhf_fast/gae.py": {"tests": [
        "tests/test_oracle_advantages.py", "tests/test_gae.py", "tests/test_advantages.py",
        *HOST], "skip_functions": ["_gae_triton", "aot_specs"]},
    "rlhf_fast/value.py": {"tests": [
        "tests/test_oracle_value_kl.py", "tests/test_value_kl_shaping.py", *HOST]},
    "rlhf_fast/kl_control.py": {"tests": [
        "tests/test_oracle_value_kl.py", "tests/test_value_kl_shaping.py", *HOST]},
    "rlhf_fast/reward_shaping.py": {"tests": [
        "tests/test_oracle_value_kl.py", "tests/test_value_kl_shaping.py", *HOST]},
    "rlhf_fast/validation.py": {"tests": [
        "tests/test_oracle_inputs.py", "tests/test_input_errors.py",
        "tests/test_policy_mechanisms.py::TestBadInput",
        "tests/test_dpo.py::test_bad_input_is_named",
        "tests/test_linear.py::test_bad_input", "tests/test_linear_dpo.py::test_bad_input",
        "tests/test_token_logprobs.py", "-k",
        "not triton and (not test_token_logprobs or out_of_range or ignore_index)"]},
    "kernels/policy_coefficient.py": {"tests": [
        "tests/test_oracle_kernel_coefficient.py", "tests/test_oracle_fused.py",
        "tests/test_policy_paths.py", "tests/test_policy_mechanisms.py", *DEVICE],
        "timeout": 300},
    "kernels/softmax_stats.py": {"tests": [
        "tests/test_oracle_softmax.py", "tests/test_oracle_fused.py",
        "tests/test_token_logprobs.py",
        "tests/test_policy_paths.py", *DEVICE], "timeout": 300},
    "kernels/softmax_grad.py": {"tests": [
        "tests/test_oracle_softmax.py", "tests/test_oracle_fused.py",
        "tests/test_token_logprobs.py",
        "tests/test_policy_paths.py", *DEVICE], "timeout": 300},
}

PYTEST_FLAGS = ["-x", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0",
                "-W", "ignore::pytest.PytestUnknownMarkWarning"]


def copy_tree(dest: Path, source: str | None) -> None:
    """The repository at ``source`` (a git revision; None: the working tree, untracked
    files included) with this folder from the working tree, plus the kernels link."""
    if source is None:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"],
                               cwd=ROOT, check=True, capture_output=True).stdout
        for name in filter(None, files.decode().split("\0")):
            src = ROOT / name
            if src.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)
    else:
        archive = subprocess.run(["git", "archive", "--format=tar", source], cwd=ROOT,
                                 check=True, capture_output=True).stdout
        with tempfile.TemporaryFile() as handle:
            handle.write(archive)
            handle.seek(0)
            with tarfile.open(fileobj=handle) as tar:
                tar.extractall(dest, filter="data")
        shutil.copytree(HERE, dest / "benchmarks" / "mutation", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "rlhf_fast" / "kernels").symlink_to("../kernels")


def module_tests(copy: Path, spec: dict) -> list[str]:
    """The module's pytest arguments with the files missing from the copy dropped."""
    args, kept = [], 0
    items = iter(spec["tests"])
    for item in items:
        if item.startswith("-"):
            args += [item, next(items)]
        elif (copy / item.split("::")[0]).exists():
            args.append(item)
            kept += 1
    if not kept:
        raise SystemExit(f"no test file of {spec['tests']} exists in the copy")
    return args


def write_config(path: Path, module: str, command: str, timeout: float) -> None:
    path.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{module}"\n'
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f"test-command = {json.dumps(command)}\n\n"
        '[cosmic-ray.distributor]\nname = "local"\n')


def mark_skipped(db_path: Path, copy: Path, module: str, skip_functions: list[str],
                 sample: int, only: set[str] | None = None) -> None:
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    source = (copy / module).read_text()
    lines = source.splitlines()
    with use_db(str(db_path)) as db:
        for item in list(db.pending_work_items):
            m = item.mutations[0]
            reason = skip_reason(source, m, skip_functions)
            key = mutant_key(module, lines, m.start_pos[0], m.start_pos[1], m.operator_name)
            if reason is None and sample > 1 and zlib.crc32(key.encode()) % sample:
                reason = f"not in the 1-in-{sample} sample"
            if reason is None and only is not None and key not in only:
                reason = "killed in an earlier run"
            if reason:
                db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED,
                                                      output=reason))


def collect(db_path: Path, copy: Path, module: str) -> list[dict]:
    from cosmic_ray.work_db import use_db

    lines = (copy / module).read_text().splitlines()
    out = []
    with use_db(str(db_path)) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome == "skipped":
                continue
            m = item.mutations[0]
            line = lines[m.start_pos[0] - 1]
            outcome = result.test_outcome.value if result.test_outcome else \
                result.worker_outcome.value
            killed_by = (result.output or "").partition("first failure: ")[2].strip()
            out.append({"module": module, "line_no": m.start_pos[0], "col": m.start_pos[1],
                        "line": line.strip(), "operator": m.operator_name,
                        "function": m.definition_name, "outcome": outcome,
                        "key": mutant_key(module, lines, m.start_pos[0], m.start_pos[1],
                                          m.operator_name),
                        "killed_by": killed_by, "diff": result.diff or ""})
    return out


def count_module(copy: Path, work: Path, module: str, spec: dict, env: dict,
                 sample: int) -> str:
    """``--count``: the number of mutants that would run, without running them."""
    from cosmic_ray.work_db import use_db

    name = Path(module).stem
    config, db = work / f"{name}.toml", work / f"{name}.sqlite"
    write_config(config, module, "true", 1)
    subprocess.run(["cosmic-ray", "init", str(config), str(db)], cwd=copy, env=env, check=True)
    mark_skipped(db, copy, module, spec.get("skip_functions", []), sample)
    with use_db(str(db)) as handle:
        return f"{module}: {sum(1 for _ in handle.pending_work_items)} mutants"


def run_module(copy: Path, work: Path, module: str, spec: dict, client: list[str],
               env: dict, sample: int, only: set[str] | None) -> list[dict]:
    name = Path(module).stem
    tests = module_tests(copy, spec)
    start = time.monotonic()
    baseline = subprocess.run([*client, "3600", *PYTEST_FLAGS, *tests], cwd=copy, env=env)
    if baseline.returncode != 0:
        raise SystemExit(f"{module}: the test selection fails unmutated ({tests})")
    base_s = time.monotonic() - start
    timeout = spec.get("timeout", max(60.0, 10 * base_s))
    command = shlex.join([*client, str(timeout), *PYTEST_FLAGS, *tests])
    config, db = work / f"{name}.toml", work / f"{name}.sqlite"
    write_config(config, module, command, timeout + 60)
    subprocess.run(["cosmic-ray", "init", str(config), str(db)], cwd=copy, env=env, check=True)
    mark_skipped(db, copy, module, spec.get("skip_functions", []), sample, only)
    print(f"{module}: baseline {base_s:.1f} s, running mutants", flush=True)
    subprocess.run(["cosmic-ray", "exec", str(config), str(db)], cwd=copy, env=env, check=True)
    return collect(db, copy, module)


def load_results(out: Path, labels: list[str]) -> list[dict]:
    """The mutants of earlier runs, keys recomputed from the checkout's sources (so runs made
    by an older version of this script, or before edits elsewhere in a module, agree)."""
    sources: dict[str, list[str]] = {}
    results = []
    for label in labels:
        for r in json.loads((out / f"{label}.json").read_text()):
            lines = sources.setdefault(r["module"],
                                       (ROOT / r["module"]).read_text().splitlines())
            r["key"] = mutant_key(r["module"], lines, r["line_no"], r["col"], r["operator"])
            results.append(r)
    return results


def summarise(results: list[dict], equivalent: dict[str, str], label: str, seconds: float,
              command: str) -> str:
    rows, survivors = [], []
    totals = dict(total=0, killed=0, equivalent=0, survived=0)
    for module in dict.fromkeys(r["module"] for r in results):
        mine = [r for r in results if r["module"] == module]
        killed = sum(r["outcome"] == "killed" for r in mine)
        equiv = [r for r in mine if r["outcome"] != "killed" and r["key"] in equivalent]
        alive = [r for r in mine if r["outcome"] != "killed" and r["key"] not in equivalent]
        survivors += alive
        denominator = len(mine) - len(equiv)
        score = 100.0 * killed / denominator if denominator else 100.0
        rows.append(f"| `{module}` | {len(mine)} | {killed} | {len(equiv)} | {len(alive)} | "
                    f"{score:.1f} % |")
        for key, value in (("total", len(mine)), ("killed", killed),
                           ("equivalent", len(equiv)), ("survived", len(alive))):
            totals[key] += value
    denominator = totals["total"] - totals["equivalent"]
    score = 100.0 * totals["killed"] / denominator if denominator else 100.0
    text = [f"# Mutation run `{label}`", "",
            f"Command: `{command}`; {seconds / 60:.0f} min.", "",
            "| module | mutants | killed | equivalent | survived | score |",
            "|---|---|---|---|---|---|", *rows,
            f"| **all** | {totals['total']} | {totals['killed']} | {totals['equivalent']} | "
            f"{totals['survived']} | **{score:.1f} %** |", "",
            "Score: killed / (mutants - equivalent).", "", "## Surviving mutants", ""]
    for r in survivors:
        text.append(f"- `{r['module']}:{r['line_no']}` ({r['function']}) "
                    f"{r['operator']} col {r['col']}: `{r['line']}`")
    return "\n".join(text) + "\n"


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the scratch copy
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="*", help="module stems or paths (default: all)")
    parser.add_argument("--source", help="git revision to test instead of the working tree")
    parser.add_argument("--label", default="mutation")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "rlhf_fast_mutation"))
    parser.add_argument("--count", action="store_true", help="count the mutants, run nothing")
    parser.add_argument("--report", nargs="+", metavar="LABEL",
                        help="run nothing: merge the results of earlier runs (DIR/LABEL.json; "
                             "a later label's outcome replaces an earlier one's for the same "
                             "mutant) and write the summary as --label")
    parser.add_argument("--survivors-of", nargs="+", metavar="LABEL",
                        help="run only the mutants that survived in these earlier runs and "
                             "are not listed as equivalent (merge with --report LABEL... "
                             "NEW_LABEL afterwards)")
    parser.add_argument("--sample", type=int, default=1,
                        help="run a fixed 1-in-N sample of the mutants (by a hash of each "
                             "mutant's name, the same in every run)")
    args = parser.parse_args()
    selected = {path: spec for path, spec in MODULES.items()
                if not args.modules or path in args.modules or Path(path).stem in args.modules}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    equivalent = equivalent_keys((ROOT / "docs" / "testing.md").read_text()
                                 if (ROOT / "docs" / "testing.md").exists() else "")
    if args.report:
        merged = {r["key"]: r for r in load_results(out, args.report)}
        results = sorted(merged.values(), key=lambda r: (list(MODULES).index(r["module"]),
                                                         r["line_no"], r["col"]))
        command = " ".join(["python benchmarks/mutation/run.py", *sys.argv[1:]])
        report = summarise(results, equivalent, args.label, 0.0, command)
        (out / f"{args.label}.json").write_text(json.dumps(results, indent=1))
        (out / f"{args.label}.md").write_text(report)
        print(report)
        return
    only = None
    if args.survivors_of:
        only = {r["key"] for r in load_results(out, args.survivors_of)
                if r["outcome"] != "killed" and r["key"] not in equivalent}
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rlhf_fast_mutants_") as scratch:
        copy, work = Path(scratch) / "repo", Path(scratch) / "work"
        copy.mkdir()
        work.mkdir()
        copy_tree(copy, args.source)
        env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
        check = subprocess.run(
            [sys.executable, "-c", "import rlhf_fast, rlhf_fast.kernels as k; "
             "print(rlhf_fast.__file__); print(k.__file__)"],
            cwd=copy, env=env, check=True, capture_output=True, text=True).stdout.split()
        if not all(Path(p).resolve().is_relative_to(copy.resolve()) for p in check):
            raise SystemExit(f"the tests would import {check}, not the copy in {copy}")
        if args.count:
            for module, spec in selected.items():
                print(count_module(copy, work, module, spec, env, args.sample))
            return
        sock = str(work / "server.sock")
        server = subprocess.Popen([sys.executable, str(HERE / "server.py"), sock],
                                  cwd=copy, env=env, stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        client = [sys.executable, str(copy / "benchmarks" / "mutation" / "client.py"), sock]
        results = []
        try:
            for module, spec in selected.items():
                if only is not None and not any(k.startswith(module + " | ") for k in only):
                    continue
                results += run_module(copy, work, module, spec, client, env, args.sample, only)
                if server.poll() is not None:
                    raise SystemExit("the fork server died: results are not valid")
        finally:
            server.terminate()  # the server kills a mutant still running
            server.wait()
    seconds = time.monotonic() - start
    command = " ".join(["python benchmarks/mutation/run.py", *sys.argv[1:]])
    (out / f"{args.label}.json").write_text(json.dumps(results, indent=1))
    report = summarise(results, equivalent, args.label, seconds, command)
    (out / f"{args.label}.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
