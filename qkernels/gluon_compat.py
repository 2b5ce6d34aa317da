"""Gluon names that changed between Triton releases, for the Gluon kernels (:mod:`qkernels.gemv_mma`,
:mod:`qkernels.gemm_wgmma`) to compile on both: written and run on Triton 3.6 (the GPU machine's), where the CTA
barrier is ``gl.thread_barrier`` and a shared-memory view is ``descriptor._reinterpret``; Triton 3.9 calls them
``gl.barrier`` and ``descriptor.reinterpret``. Inside a kernel, ``barrier()`` and ``reinterpret(desc, dtype, shape,
layout)`` call whichever this Triton has. (On 3.9 the kernels compile for sm_90; they have not run there.)
"""

from __future__ import annotations

from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import tma

barrier = getattr(gl, "thread_barrier", None) or gl.barrier
reinterpret = getattr(gl.shared_memory_descriptor, "_reinterpret", None) or gl.shared_memory_descriptor.reinterpret
async_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
