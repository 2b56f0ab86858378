"""actsparse: training-free activation sparsity (CHESS) for llama.cpp / GGUF models."""

__version__ = "0.1.0"

from .runtime import Llama, SparseError, enable_sparse, model_levels, set_sparse_prompt, sparse_stats  # noqa: E402

__all__ = [
    "Llama",
    "SparseError",
    "enable_sparse",
    "model_levels",
    "set_sparse_prompt",
    "sparse_stats",
    "__version__",
]
