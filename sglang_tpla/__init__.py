"""sglang-tpla: Tensor-Parallel Latent Attention (TPLA, arXiv 2508.15881) for SGLang.

The pure-math modules (:mod:`sglang_tpla.layout`, :mod:`sglang_tpla.transforms`,
:mod:`sglang_tpla.reference`, :mod:`sglang_tpla.shapes`, :mod:`sglang_tpla.tiny_model`)
import only PyTorch; importing this package never imports SGLang.
"""

__version__ = "0.1.0"
