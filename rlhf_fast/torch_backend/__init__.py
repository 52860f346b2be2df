"""The torch backend: the kernels' math in PyTorch, chunked over rows, for tensors on the CPU.

Same statistics, same hand-derived gradients and the same accuracy rules as ``kernels/``;
memory is bounded by one chunk of float32 temporaries (``chunk_bytes``), never ``[N, V]``.
The reference (``rlhf_fast.reference``) is separate and uses autograd.
"""
