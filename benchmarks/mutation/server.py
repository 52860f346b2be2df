"""Fork server for the mutation runs: pytest in a forked child per mutant.

Importing torch, triton, numpy, hypothesis and pytest costs about 2 s of the 2.5 s a plain
``python -m pytest`` of a small test file takes. This server imports them once; for every
request (a list of pytest arguments, sent by ``client.py``, which is cosmic-ray's test
command) it forks a child that imports ``rlhf_fast`` afresh from the (mutated) sources,
runs ``pytest.main`` and exits with its status. Nothing of ``rlhf_fast`` is imported here.

    python benchmarks/mutation/server.py SOCKET_PATH

A child that runs longer than the request's timeout is killed and reported as exit status
124 (a hang is a detected mutant, as cosmic-ray counts its own timeouts).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

# The tests' conftest sets these before triton is imported; the server imports triton first.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.dont_write_bytecode = True  # a mutant must never run from a stale .pyc

import hypothesis  # noqa: E402, F401
import numpy  # noqa: E402, F401
import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language  # noqa: E402, F401

TIMEOUT_EXIT = 124


class FirstFailure:
    """pytest plugin: the node id of the first failing test (or collection error)."""

    def __init__(self, write_fd: int):
        self.write_fd = write_fd
        self.reported = False

    def _report(self, nodeid: str) -> None:
        if not self.reported:
            os.write(self.write_fd, nodeid.encode()[:4000])
            self.reported = True

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self._report(report.nodeid)

    def pytest_collectreport(self, report):
        if report.failed:
            self._report(report.nodeid or "collection")


def run_child(args: list[str], write_fd: int) -> None:
    """In the forked child: silence output, run pytest, exit with its status."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        code = int(pytest.main(args, plugins=[FirstFailure(write_fd)]))
    except BaseException:
        code = 99
    os._exit(code)


CHILDREN: set[int] = set()
"""Forked children still running: killed with the server."""


def stop(*_: object) -> None:
    for pid in CHILDREN:
        os.kill(pid, signal.SIGKILL)
    os._exit(143)


def run_request(args: list[str], timeout: float) -> tuple[int, str]:
    """(exit status, node id of the first failing test or "")."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        run_child(args, write_fd)
    CHILDREN.add(pid)
    os.close(write_fd)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            code = TIMEOUT_EXIT
            break
        time.sleep(0.01)
    CHILDREN.discard(pid)
    failed = os.read(read_fd, 4096).decode(errors="replace")
    os.close(read_fd)
    return code, failed


def serve(path: str) -> None:
    signal.signal(signal.SIGTERM, stop)
    torch.set_num_threads(1)
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            request = json.loads(data)
            if request == "stop":
                return
            code, failed = run_request(request["args"], request["timeout"])
            conn.sendall((json.dumps([code, failed]) + "\n").encode())


if __name__ == "__main__":
    serve(sys.argv[1])
