"""The KV cache between graph calls: one OrtValue per layer for keys and one for values.

The graphs take `past_key_values.{i}.key|value` [B, kv_heads, past, D] and return `present.{i}.key|value`
[B, kv_heads, past + S, D]; the presents of one call are bound, as they are, as the next call's pasts.
"""
import numpy as np
import onnxruntime as ort


class KVCache:
    """Past keys and values for a batch; `bind` feeds them to a call, `update` takes the presents."""

    def __init__(self, spec: dict, batch: int):
        self.layers = spec["num_layers"]
        self.names = [(spec["past_key"].format(layer=i), spec["past_value"].format(layer=i),
                       spec["present_key"].format(layer=i), spec["present_value"].format(layer=i))
                      for i in range(self.layers)]
        empty = np.zeros((batch, spec["num_key_value_heads"], 0, spec["head_dim"]), dtype=np.float32)
        self.values = [ort.OrtValue.ortvalue_from_numpy(empty) for _ in range(2 * self.layers)]

    @property
    def length(self) -> int:
        """Positions held (for a batch: the longest row's, shorter rows padded)."""
        return self.values[0].shape()[2]

    def bind(self, binding: ort.IOBinding) -> None:
        for i, (past_k, past_v, present_k, present_v) in enumerate(self.names):
            binding.bind_ortvalue_input(past_k, self.values[2 * i])
            binding.bind_ortvalue_input(past_v, self.values[2 * i + 1])
            binding.bind_output(present_k)
            binding.bind_output(present_v)

    @classmethod
    def join(cls, caches: list["KVCache"], length: int) -> "KVCache":
        """One batch cache from single-row caches, each row right-padded with zeros to `length` positions."""
        joined = cls.__new__(cls)
        joined.layers, joined.names = caches[0].layers, caches[0].names
        joined.values = []
        for i in range(2 * joined.layers):
            rows = [c.values[i].numpy() for c in caches]
            batch = np.zeros((len(rows), rows[0].shape[1], length, rows[0].shape[3]), dtype=rows[0].dtype)
            for r, v in enumerate(rows):
                batch[r, :, :v.shape[2]] = v[0]
            joined.values.append(ort.OrtValue.ortvalue_from_numpy(batch))
        return joined

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions (a chat's shared prefix), dropping the rest."""
        if length < self.length:
            self.values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :length]))
                           for v in self.values]

    def update(self, presents: list) -> None:
        """Take the presents of a call, in the order `bind` declared them."""
        assert len(presents) == 2 * self.layers
        self.values = list(presents)
