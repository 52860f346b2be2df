"""Run benchmark jobs in this (fresh) process and print their records as one JSON list.

``python -m rlhf_fast.bench.worker '<json>'`` with ``{"threads": ..., "jobs": [{"suite":
..., "case": {...}, "impl": ..., "device": ..., "warmup": ..., "reps": ...}, ...]}``. The
CPU runner starts one per suite so that peak resident memory is measured from a
clean process (``measure.peak_extra_mib`` hands freed pages back between jobs).
"""

from __future__ import annotations

import json
import sys
import traceback

import torch

from .case import Case
from .suites import SUITES, case_label


def run_job(job: dict) -> dict:
    suite = SUITES[job["suite"]]
    case = Case(**job["case"])
    try:
        return suite.run_case(case, job["impl"], torch.device(job["device"]),
                              warmup=job["warmup"], reps=job["reps"])
    except Exception as error:  # one failing implementation must not hide the others
        traceback.print_exc()
        return {"suite": suite.SUITE, "case": job["case"], "label": case_label(suite, case),
                "mode": case.mode, "impl": job["impl"], "status": "error",
                "reason": f"{type(error).__name__}: {error}"}


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    print(json.dumps([run_job(job) for job in spec["jobs"]]))


if __name__ == "__main__":
    main()
