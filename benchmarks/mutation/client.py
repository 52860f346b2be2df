"""cosmic-ray's test command: ask the fork server to run pytest, exit with its status.

    python benchmarks/mutation/client.py SOCKET_PATH TIMEOUT_S PYTEST_ARGS...

Imports nothing heavy, so a mutant costs the forked pytest run and not a Python start-up
with torch.
"""

import json
import socket
import sys


def main() -> int:
    path, timeout, args = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        conn.sendall((json.dumps({"args": args, "timeout": timeout}) + "\n").encode())
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                return 98  # the server died: count it as a failed run, never as a survivor
            reply += chunk
    code, failed = json.loads(reply)
    print(f"first failure: {failed}" if failed else "no failure")  # kept in cosmic-ray's db
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
