"""Run one benchmark case in this (fresh) process and print its record as one JSON line.

``python -m rlhf_fast.bench.worker '<json>'`` with ``{"suite": ..., "case": {...}, "impl":
..., "device": ..., "warmup": ..., "reps": ...}``. The CPU runner uses it so that each
measurement of peak resident memory starts from a clean process.
"""

from __future__ import annotations

import json
import sys

import torch

from .suites import SUITES


def main() -> None:
    job = json.loads(sys.argv[1])
    torch.set_num_threads(job.get("threads", torch.get_num_threads()))
    suite = SUITES[job["suite"]]
    record = suite.run_case(suite.Case(**job["case"]), job["impl"], torch.device(job["device"]),
                            warmup=job["warmup"], reps=job["reps"])
    print(json.dumps(record))


if __name__ == "__main__":
    main()
