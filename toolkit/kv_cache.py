"""The KV cache between graph calls: preallocated buffers that every call writes in place.

The graphs take `past_key_values.{i}.key|value` and return `present.{i}.key|value`, both [B, kv_heads,
positions, D]. Here one buffer per layer for keys and one for values, [B, kv_heads, capacity, D], is bound
as both the past input and the present output of every call: GroupQueryAttention appends the new keys and
values in place (onnxruntime's past/present buffer sharing), so a step copies and allocates nothing.
`length` is the number of positions in use (the attention mask's width); cutting the cache back (a chat's
shared prefix, a rejected speculative draft) just lowers it. The capacity starts small and doubles when a
call needs more (one copy), up to `limit` (the model's max_length): the full context is never allocated
up front. Graphs exported with `--ops portable` (standard attention) return present = [past; new] as new
tensors instead (manifest kv_cache.in_place false): then the presents of one call are the next call's pasts.
An export with `--kv-cache int8` keeps int8 buffers (kv_cache.dtype): the graphs quantize what they append
with per-channel scales they hold, so growing, joining and truncating still just copy bytes. A float16
export (--device cuda|dml) keeps float16 buffers; on a GPU provider they live in the device's memory
(`device`), bound the same way, so a step moves only the token ids in and the logits out; growing and
joining (rare: the capacity doubles) go through the host.
"""
import numpy as np
import onnxruntime as ort

from toolkit.errors import ContextOverflowError
from toolkit.manifest import layer_name

START = 256  # positions allocated at first
DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}  # the manifest's kv_cache.dtype (int8: scales in the graphs)


class KVCache:
    """Keys and values of a batch of sequences; `bind` feeds them to a call, which extends them in place."""

    def __init__(self, spec: dict, batch: int, limit: int, capacity: int = START, device: str = "cpu"):
        self.spec = spec  # the manifest's kv_cache section
        self.layers = spec["num_layers"]
        self.names = [tuple(layer_name(spec[k], i) for k in ("past_key", "past_value", "present_key", "present_value"))
                      for i in range(self.layers)]
        self.batch, self.heads, self.head_dim = batch, spec["num_key_value_heads"], spec["head_dim"]
        self.limit = limit
        self.in_place = spec.get("in_place", True)
        self.dtype = DTYPES[spec.get("dtype", "float32")]
        self.device = device  # OrtValue device type of the buffers: "cpu", "cuda" or "dml"
        self.length = 0  # positions in use (for a batch: the longest row's, shorter rows padded)
        if self.in_place:
            self._allocate(min(capacity, limit))
        else:
            self.arrays = None
            self.values = [ort.OrtValue.ortvalue_from_numpy(self._zeros(0)) for _ in range(2 * self.layers)]

    def _zeros(self, positions: int) -> np.ndarray:
        return np.zeros((self.batch, self.heads, positions, self.head_dim), dtype=self.dtype)

    @property
    def capacity(self) -> int:
        return self.values[0].shape()[2]

    def host(self, i: int) -> np.ndarray:
        """Buffer i (keys of layer i // 2, or values) as a host array: the buffer itself on the CPU, a copy
        from a GPU."""
        return self.arrays[i] if self.arrays is not None else self.values[i].numpy()

    def _allocate(self, capacity: int, contents: list | None = None) -> None:
        """Fresh buffers of `capacity` positions holding the first `length` positions of `contents` (host
        arrays; default: the current buffers)."""
        if contents is None and hasattr(self, "values"):
            contents = [self.host(i) for i in range(2 * self.layers)]
        arrays = [self._zeros(capacity) for _ in range(2 * self.layers)]
        for new, previous in zip(arrays, contents or ()):
            new[:, :, :self.length] = previous[:, :, :self.length]
        if self.device == "cpu":  # OrtValues over the numpy buffers (no copy): what the graph writes, they see
            self.arrays = arrays
            self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        else:  # one upload to the device's memory
            self.arrays = None
            self.values = [ort.OrtValue.ortvalue_from_numpy(a, self.device, 0) for a in arrays]

    def reserve(self, positions: int) -> None:
        """Make room for `positions` positions in all (doubling the capacity, at most to the limit)."""
        if positions > self.limit:
            raise ContextOverflowError(f"KV cache: {positions} positions do not fit max_length {self.limit}")
        if self.in_place and positions > self.capacity:
            capacity = self.capacity
            while capacity < positions:
                capacity *= 2
            self._allocate(min(capacity, self.limit))

    def bind(self, binding: ort.IOBinding, new_tokens: int) -> None:
        """Bind the buffers as past and present of a call that adds `new_tokens` positions."""
        self.reserve(self.length + new_tokens)
        for i, (past_k, past_v, present_k, present_v) in enumerate(self.names):
            binding.bind_ortvalue_input(past_k, self.values[2 * i])
            binding.bind_ortvalue_input(past_v, self.values[2 * i + 1])
            if self.in_place:
                binding.bind_ortvalue_output(present_k, self.values[2 * i])
                binding.bind_ortvalue_output(present_v, self.values[2 * i + 1])
            else:
                binding.bind_output(present_k)
                binding.bind_output(present_v)

    def advance(self, new_tokens: int, presents: list) -> None:
        """After a call: its positions are in use (`presents`: the call's present outputs, in bind order)."""
        self.length += new_tokens
        if not self.in_place:
            self.values = list(presents)

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions (a chat's shared prefix, an accepted draft), dropping the rest."""
        if length < self.length and not self.in_place:
            self.values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :length]))
                           for v in self.values]
        self.length = min(self.length, length)

    @classmethod
    def join(cls, caches: list["KVCache"], length: int) -> "KVCache":
        """One batch cache from single-row caches, each row's positions first, the rest zeros (right padding)."""
        first = caches[0]
        joined = cls(first.spec, len(caches), first.limit, capacity=0, device=first.device)
        arrays = [joined._zeros(max(length, START) if first.in_place else length) for _ in range(2 * first.layers)]
        for i, array in enumerate(arrays):
            for r, c in enumerate(caches):
                array[r, :, :c.length] = c.host(i)[0, :, :c.length]
        joined.length = length
        if first.in_place:
            joined._allocate(arrays[0].shape[2], arrays)
        else:
            joined.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        return joined


class PrefixCache:
    """A one-row KV cache that remembers the token ids it holds, so that a prompt starting with them
    prefills only the rest: a chat's next turn, or a client re-sending its history to the server."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.ids: list[int] = []  # the tokens whose keys and values the cache holds

    def reuse(self, ids: list[int]) -> KVCache:
        """The cache cut back to the longest common prefix of `ids` and what it holds (leaving at least one
        token of `ids` to prefill), ready to be extended with the rest of `ids`."""
        common = min(common_prefix(self.ids, ids), len(ids) - 1)
        self.cache.truncate(common)
        self.ids = self.ids[:common]
        return self.cache

    def record(self, ids: list[int], generated: list[int]) -> None:
        """After a generation on `ids` that sampled `generated`: the ids the cache now holds (all it was
        fed, which stops short of the last token sampled, or earlier if the generation was stopped)."""
        self.ids = (ids + generated)[:self.cache.length]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
