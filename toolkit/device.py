"""Which onnxruntime execution provider runs a model folder, and where its KV cache lives.

A folder is exported for one device (the manifest's `device`, `qwen-edge export --device`): "cpu" graphs
use float32 activations, which onnxruntime's CUDA GroupQueryAttention cannot take; "cuda" and "dml" graphs
use float16, which the CPU provider also runs (slower; that is how they are validated without a GPU).

    provider   runs folders exported for   KV cache on
    cpu        cpu, cuda, dml              host memory
    cuda       cuda                        the GPU (OrtValues bound as past and present: no copy per token)
    dml        dml                         the GPU
    auto       the first of cuda, dml, cpu that this onnxruntime has and the folder fits
"""
import onnxruntime as ort

from toolkit.errors import ArgumentError, ModelFolderError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider"}
RUNS = {"cpu": ("cpu", "cuda", "dml"), "cuda": ("cuda",), "dml": ("dml",)}  # provider -> export devices
# a provider's name is also the OrtValue device type its KV cache buffers are allocated on


def choose(provider: str, exported_for: str, folder) -> str:
    """The provider ("cpu", "cuda" or "dml") that runs a folder exported for `exported_for`, given the
    `provider` asked for ("auto" or one of PROVIDERS). Raises a one-line error naming what is missing."""
    available = ort.get_available_providers()
    if provider == "auto":
        for name in ("cuda", "dml", "cpu"):
            if PROVIDERS[name] in available and exported_for in RUNS[name]:
                return name
        raise ArgumentError(f"provider 'auto': no provider of this onnxruntime ({', '.join(available)}) runs "
                            f"{folder}, exported for {exported_for}")
    if provider not in PROVIDERS:
        raise ArgumentError(f"provider {provider!r}: expected auto or one of {', '.join(PROVIDERS)}")
    if PROVIDERS[provider] not in available:
        raise ArgumentError(f"provider {provider!r}: this onnxruntime build has only {', '.join(available)}"
                            + (" (pip install 'qwen-edge[cuda]')" if provider == "cuda" else
                               " (pip install 'qwen-edge[dml]', Windows)" if provider == "dml" else ""))
    if exported_for not in RUNS[provider]:
        raise ModelFolderError(f"{folder}: exported for {exported_for}; the {provider} provider has no kernels for "
                               f"its graphs (activation types, ops); re-export it with --device {provider}")
    return provider
