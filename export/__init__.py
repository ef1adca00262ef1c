"""qwen-edge converter: a Qwen2 checkpoint in, a quantized prefill + decode ONNX model folder out."""
from export.convert import export
from export.quantize import QuantSpec

__all__ = ["export", "QuantSpec"]
