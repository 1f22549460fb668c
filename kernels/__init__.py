"""lmcor.kernels: Triton kernels, each with its launcher and a NumPy/PyTorch reference."""
