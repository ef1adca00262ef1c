"""qwen-edge runtime: load an exported Qwen2 model folder and generate text with ONNX Runtime (no torch)."""
from toolkit.errors import ArgumentError, ContextOverflowError, ModelFolderError, QwenEdgeError
from toolkit.generation import Completion, Stats
from toolkit.model import Model, load
from toolkit.session import ChatSession
from toolkit.tools import ParsedAnswer, ToolAnswer, ToolCall, parse_tool_calls

__version__ = "0.1.0"
__all__ = ["load", "Model", "ChatSession", "Completion", "Stats", "ToolCall", "ToolAnswer", "ParsedAnswer",
           "parse_tool_calls", "QwenEdgeError", "ModelFolderError", "ArgumentError", "ContextOverflowError",
           "__version__"]
