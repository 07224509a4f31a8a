"""Triton kernels. Import the submodules explicitly (``from kernels.infonce import ...``):
importing Triton kernels fixes whether they run compiled or interpreted (TRITON_INTERPRET)."""
