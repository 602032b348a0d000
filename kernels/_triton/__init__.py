"""Triton kernels: the CUDA implementations of probescope.kernels' ops (imported on first use).

Under ``TRITON_INTERPRET=1`` they also run on CPU tensors, which is how the CPU test suite holds
them to the torch references.
"""
