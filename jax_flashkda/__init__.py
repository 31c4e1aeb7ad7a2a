"""Kimi Delta Attention for JAX: Hopper CUDA kernels behind the XLA FFI, pure JAX elsewhere."""

from jax_flashkda.ops import check_cu_seqlens, cuda_unavailable_reason, kda

__all__ = ["kda", "check_cu_seqlens", "cuda_unavailable_reason"]
__version__ = "0.1.0"
