"""moelab's own C kernels, compiled on first use (``build``) and called through ctypes (``qmatmul``).

Today: weight-only int8 / int4 matmuls for CPU decoding, which stream a 16-row interleaved
weight layout at close to the memory bandwidth (PyTorch's own int8 kernel reaches about half
of it here). Optional by design: where they cannot be built, PyTorch's kernels run instead.
"""
