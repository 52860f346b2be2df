"""Benchmark harness behind ``rlhf-fast bench``.

- ``measure``   timing (CUDA events or perf_counter, median after warm-up) and peak extra
                memory (``torch.cuda.max_memory_allocated``, or the peak resident set of a
                child process on the CPU);
- ``ceilings``  the hardware measured in the same run (device-to-device copy bandwidth);
- ``suites``    the cases of each op and the implementations compared on them;
- ``worker``    runs a suite's jobs in a child process (CPU memory needs a fresh process);
- ``runner``    runs a suite, derives the ratios, prints the table, writes JSON / Markdown.
"""
