"""portattn: exact FlashAttention for every CUDA GPU, Maxwell (sm_50) to Hopper.

Importing does no GPU work and needs no CUDA driver; kernels compile through NVRTC on
first use. ``explain(...)`` says which path and tiles a call would run, and why.
"""
__version__ = "0.1.0"

from .api import Explanation, explain, flash_attn_func
from .backward import flash_attn_backward
from .arch import Problem, detect, select_plan
from .compile import KernelCompileError
from .kvcache import KVCacheExplanation, explain_kvcache, flash_attn_with_kvcache
from .varlen import explain_varlen, flash_attn_varlen_backward, flash_attn_varlen_func

__all__ = ["Explanation", "KernelCompileError", "Problem", "detect", "explain",
           "flash_attn_backward", "flash_attn_func", "flash_attn_with_kvcache", "explain_kvcache",
           "KVCacheExplanation", "select_plan", "explain_varlen", "flash_attn_varlen_backward",
           "flash_attn_varlen_func", "__version__"]
