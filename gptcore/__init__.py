"""gptcore: GPT-2-family training and inference on fused Triton and CUDA kernels.

Every fast path has a plain PyTorch twin it is tested against (see ``gptcore.ops``):

    from gptcore import GPT, GPTConfig
    model = GPT(GPTConfig.from_preset("gpt2"), backend="triton")
"""
from gptcore.config import GPTConfig, PRESETS
from gptcore.model import GPT

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "PRESETS", "__version__"]
