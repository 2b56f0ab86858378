"""actsparse: training-free activation sparsity (CHESS) for llama.cpp / GGUF models."""

__version__ = "0.1.0"
