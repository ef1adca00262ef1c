"""qwen-edge runtime: load an exported Qwen2 model folder and generate text with ONNX Runtime (no torch)."""
from toolkit.errors import ArgumentError, ContextOverflowError, ModelFolderError, QwenEdgeError
from toolkit.model import Completion, Model, load

__version__ = "0.1.0"
__all__ = ["load", "Model", "Completion", "QwenEdgeError", "ModelFolderError", "ArgumentError",
           "ContextOverflowError", "__version__"]
