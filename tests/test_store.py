"""The store pass (export/store.py): tensors streamed in row blocks give the same weights file as whole
matrices, the progress line counts every matrix, and a chunked tensor must fill its declared shape."""
import numpy as np
import pytest

from export import QuantSpec, export, store
from export.onnx_builder import FLOAT, WeightFile


@pytest.mark.parametrize("name,spec,ops", [
    ("untied_bf16", QuantSpec.recommended(4, group_size=16), "fast"),  # calibrated, asymmetric, int8 lm_head
    ("tied_fp32", QuantSpec(4, 32, symmetric=True), "fast"),
    ("untied_bf16", QuantSpec(8, 32), "portable"),
    ("untied_bf16", QuantSpec(32), "fast"),
])
def test_row_blocks_change_nothing(name, spec, ops, checkpoint, tmp_path, monkeypatch):
    """One row per block (the 7B's lm_head is read 2,048 rows at a time) writes the same bytes."""
    whole = export(checkpoint(name), tmp_path / "whole", spec, log=lambda m: None, ops=ops)
    monkeypatch.setattr(store, "BLOCK_ELEMENTS", 1)
    rows = export(checkpoint(name), tmp_path / "rows", spec, log=lambda m: None, ops=ops)
    assert (whole / "model.weights").read_bytes() == (rows / "model.weights").read_bytes()


def test_progress_counts_every_matrix(checkpoint, tmp_path, monkeypatch):
    lines = []
    monkeypatch.setattr("export.convert.progress_line", lambda line, final: lines.append((line, final)))
    export(checkpoint("untied_bf16"), tmp_path / "out", QuantSpec(4, 32), log=lambda m: None)
    # 2 layers x 7 Linears + the embedding + the lm_head
    assert lines[-1][0].startswith("quantizing: 16/16 matrices, ") and lines[-1][1]
    assert all(not final for _, final in lines[:-1])


def test_a_chunked_tensor_must_fill_its_shape(tmp_path):
    file = WeightFile(tmp_path / "w")
    with pytest.raises(ValueError, match="needs 24"):
        file.add_chunks("t", [np.zeros(2, np.float32), np.zeros(3, np.float32)], (2, 3), FLOAT)
    file.close()
