"""gptcore's Triton kernels (installed as ``gptcore.kernels``) and their reference twins.

One file per op: the @triton.jit kernels, the launcher, the autograd Function and the public
function. ``reference`` holds the plain PyTorch twin of each op and never needs Triton.
Kernel modules import Triton, so they are loaded on first use: ``import gptcore.kernels``
works on machines without Triton, and ``gptcore.ops`` says why a kernel cannot run there.
"""
from gptcore.kernels.reference import attention_ref, gelu_ref, layer_norm_ref

__all__ = ["attention_ref", "gelu_ref", "layer_norm_ref"]
