"""gptcore's benchmark suite: every fast path beside its references, in physical units.

Run ``python -m bench [kernels|train|generate|all]`` from the repository root.
"""
