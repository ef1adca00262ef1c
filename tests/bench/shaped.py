"""Checkpoints with the released Qwen2.5 shapes and random bf16 weights, for measuring export and run cost
at 1.5B / 3B / 7B without the real weights (not run in CI).

    .venv/bin/python tests/bench/shaped.py 7b models/shaped-7b [--seed 0] [--check]
    .venv/bin/python tests/bench/shaped.py 1.5b models/shaped-1.5b

What is written is what `from_pretrained` / the exporter would find in the released Instruct folders:
config.json with the released shape fields (hidden, intermediate, layers, heads, kv heads, vocab, tying,
rope_theta, eps, sliding-window fields, bos/eos, torch_dtype bfloat16), safetensors shards split as the
originals are (at most 4 GB each, in the model's state_dict order: 1.5B one model.safetensors, 3B two
shards, 7B four, with model.safetensors.index.json), and the sample's tokenizer files and
generation_config.json (models/qwen2.5-coder-0.5b-instruct-hf; Qwen2.5 and Qwen2.5-Coder share the
tokenizer). The weights are random but of a realistic scale: matrices and the embedding N(0, 0.02),
q/k/v biases N(0, 0.02), norms 1 + N(0, 0.05). Each tensor has its own seed (the run's seed and the
tensor's name), so a folder is reproducible tensor by tensor.

Memory stays bounded: the shard's header is computed from the shapes, then every tensor is generated and
written in chunks of 16 Mi values (float32 -> bf16 with round-to-nearest-even in numpy), so peak RSS is
~200 MB whatever the size. Each shard is written as NAME.partial and renamed when complete; config.json
is written last, so a folder with config.json and shards of the expected sizes is complete and a second
run skips it (an interrupted run resumes at the first incomplete shard). shaped.json records the seed
and that the weights are random.
"""
import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_HF = ROOT / "models" / "qwen2.5-coder-0.5b-instruct-hf"
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "chat_template.jinja", "generation_config.json")
MAX_SHARD_BYTES = 4_000_000_000  # transformers' "4GB" (decimal), what the released shards were cut at
CHUNK = 16 * 2**20  # values generated at a time

# Released Qwen2.5-*-Instruct config.json fields (Hugging Face Qwen/Qwen2.5-{1.5B,3B,7B}-Instruct).
_COMMON = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 32768,
    "model_type": "qwen2", "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False,
}
SHAPES = {
    "1.5b": {"name": "Qwen2.5-1.5B-Instruct", "shards": 1, "config": {
        "hidden_size": 1536, "intermediate_size": 8960, "max_window_layers": 21, "num_attention_heads": 12,
        "num_hidden_layers": 28, "num_key_value_heads": 2, "sliding_window": 32768, "tie_word_embeddings": True,
        "vocab_size": 151936}},
    "3b": {"name": "Qwen2.5-3B-Instruct", "shards": 2, "config": {
        "hidden_size": 2048, "intermediate_size": 11008, "max_window_layers": 70, "num_attention_heads": 16,
        "num_hidden_layers": 36, "num_key_value_heads": 2, "sliding_window": 32768, "tie_word_embeddings": True,
        "vocab_size": 151936}},
    "7b": {"name": "Qwen2.5-7B-Instruct", "shards": 4, "config": {
        "hidden_size": 3584, "intermediate_size": 18944, "max_window_layers": 28, "num_attention_heads": 28,
        "num_hidden_layers": 28, "num_key_value_heads": 4, "sliding_window": 131072, "tie_word_embeddings": False,
        "vocab_size": 152064}},
}
ALIASES = {"1.5": "1.5b", "1_5b": "1.5b", "3": "3b", "7": "7b"}


def config_for(size: str) -> dict:
    return dict(sorted({**_COMMON, **SHAPES[size]["config"]}.items()))


def tensors(cfg: dict) -> list[tuple[str, tuple, str]]:
    """(name, shape, kind) in Qwen2ForCausalLM's state_dict order; kind: matrix, bias, norm."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (v, h), "matrix")]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (h, h), "matrix"), (p + "self_attn.q_proj.bias", (h,), "bias"),
                (p + "self_attn.k_proj.weight", (kv, h), "matrix"), (p + "self_attn.k_proj.bias", (kv,), "bias"),
                (p + "self_attn.v_proj.weight", (kv, h), "matrix"), (p + "self_attn.v_proj.bias", (kv,), "bias"),
                (p + "self_attn.o_proj.weight", (h, h), "matrix"),
                (p + "mlp.gate_proj.weight", (inter, h), "matrix"), (p + "mlp.up_proj.weight", (inter, h), "matrix"),
                (p + "mlp.down_proj.weight", (h, inter), "matrix"),
                (p + "input_layernorm.weight", (h,), "norm"), (p + "post_attention_layernorm.weight", (h,), "norm")]
    out.append(("model.norm.weight", (h,), "norm"))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h), "matrix"))
    return out


def nbytes(shape) -> int:
    return 2 * int(np.prod(shape))


def plan_shards(ts: list, want: int) -> list[list]:
    """Split in state_dict order, a new shard when the next tensor would pass MAX_SHARD_BYTES (as
    transformers' save_pretrained does); the count must be the released one."""
    shards, cur, size = [], [], 0
    for t in ts:
        if cur and size + nbytes(t[1]) > MAX_SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += nbytes(t[1])
    shards.append(cur)
    if len(shards) != want:
        raise SystemExit(f"internal: {len(shards)} shards planned, the release has {want}")
    return shards


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def header_bytes(shard: list) -> tuple[bytes, list]:
    """The safetensors header (tensors sorted by name, as the safetensors library writes them) and the
    tensors in file order."""
    order = sorted(shard, key=lambda t: t[0])
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in order:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nbytes(shape)]}
        off += nbytes(shape)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, order


def expected_size(shard: list) -> int:
    return len(header_bytes(shard)[0]) + sum(nbytes(t[1]) for t in shard)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even, in place on x's buffer."""
    u = x.view(np.uint32)
    u += 0x7FFF + ((u >> 16) & 1)
    u >>= 16
    return u.astype(np.uint16)


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def write_tensor(f, name: str, shape: tuple, kind: str, seed: int) -> None:
    rng = np.random.default_rng(tensor_seed(seed, name))
    n = int(np.prod(shape))
    for start in range(0, n, CHUNK):
        x = rng.standard_normal(min(CHUNK, n - start), dtype=np.float32)
        if kind == "norm":
            x *= np.float32(0.05)
            x += np.float32(1.0)
        else:
            x *= np.float32(0.02)
        f.write(to_bf16(x).tobytes())


def write_shard(path: Path, shard: list, seed: int, log) -> None:
    head, order = header_bytes(shard)
    tmp = path.with_name(path.name + ".partial")
    t = time.time()
    with open(tmp, "wb") as f:
        f.write(head)
        written = 0
        for name, shape, kind in order:
            write_tensor(f, name, shape, kind, seed)
            written += nbytes(shape)
            if written >= 1 << 30:  # do not let gigabytes of dirty pages pile up on a shared machine
                f.flush()
                os.fdatasync(f.fileno())
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                written = 0
        f.flush()
        os.fdatasync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    os.replace(tmp, path)
    log(f"{path}: {path.stat().st_size / 1e9:.2f} GB, {len(order)} tensors in {time.time() - t:.0f} s")


def is_complete(out: Path, size: str) -> bool:
    cfg = config_for(size)
    shards = plan_shards(tensors(cfg), SHAPES[size]["shards"])
    names = shard_names(len(shards))
    if not (out / "config.json").exists():
        return False
    try:
        if json.loads((out / "config.json").read_text()) != cfg:
            return False
    except ValueError:
        return False
    return all((out / n).exists() and (out / n).stat().st_size == expected_size(s) for n, s in zip(names, shards))


def write(size: str, out: Path, seed: int = 0, sample: Path = SAMPLE_HF, log=None) -> Path:
    """Write the shaped checkpoint `size` into folder `out` (skipped if already complete)."""
    log = log or (lambda m: print(m, file=sys.stderr))
    out = Path(out)
    if is_complete(out, size):
        log(f"{out}: complete, skipped")
        return out
    for name in ("tokenizer.json", "generation_config.json"):
        if not (sample / name).exists():
            raise SystemExit(f"{sample / name}: missing (run models/get_sample.py first)")
    cfg = config_for(size)
    ts = tensors(cfg)
    shards = plan_shards(ts, SHAPES[size]["shards"])
    names = shard_names(len(shards))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # written last: its presence marks a complete folder
    for fname, shard in zip(names, shards):
        p = out / fname
        if p.exists() and p.stat().st_size == expected_size(shard):
            log(f"{p}: already written")
            continue
        write_shard(p, shard, seed, log)
    total = sum(nbytes(t[1]) for t in ts)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: fname for fname, shard in zip(names, shards) for name, _, _ in shard}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name in SIDE_FILES:
        if (sample / name).exists():
            shutil.copyfile(sample / name, out / name)
    params = sum(int(np.prod(t[1])) for t in ts)
    (out / "shaped.json").write_text(json.dumps({
        "shape_of": SHAPES[size]["name"], "random_weights": True, "seed": seed, "parameters": params,
        "weights_bytes": total, "written_by": "tests/bench/shaped.py", "tokenizer_from": str(sample),
        "init": "matrices, embedding and q/k/v biases N(0, 0.02); norms 1 + N(0, 0.05); bf16 round-to-nearest-even",
    }, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    log(f"{out}: {SHAPES[size]['name']} shape, {params / 1e9:.2f} B parameters, {total / 1e9:.2f} GB in "
        f"{len(shards)} shard(s)")
    return out


def check(out: Path, size: str) -> None:
    """Read the folder back with the reference tools: transformers' config, safetensors' reader."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    cfg = config_for(size)
    hf = AutoConfig.from_pretrained(out)
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert getattr(hf, k) == cfg[k], (k, getattr(hf, k), cfg[k])
    ts = {name: (shape, kind) for name, shape, kind in tensors(cfg)}
    shards = plan_shards(tensors(cfg), SHAPES[size]["shards"])
    seen = set()
    for fname in shard_names(len(shards)):
        with safe_open(out / fname, framework="pt") as f:
            for name in f.keys():
                seen.add(name)
                sl = f.get_slice(name)
                assert tuple(sl.get_shape()) == ts[name][0] and sl.get_dtype() == "BF16", name
            for name in list(f.keys())[:3] + [k for k in f.keys() if k.endswith("norm.weight")][:1]:
                x = f.get_slice(name)[:8].float() if len(ts[name][0]) == 1 else f.get_slice(name)[:64].float()
                want = (1.0, 0.05) if ts[name][1] == "norm" else (0.0, 0.02)
                assert torch.isfinite(x).all() and abs(x.mean().item() - want[0]) < 0.05, (name, x.mean())
                print(f"  {fname} {name} {list(ts[name][0])} mean {x.mean().item():+.4f} std {x.std().item():.4f}")
    assert seen == set(ts), set(ts) ^ seen
    print(f"{out}: {len(seen)} tensors, shapes and dtype as config.json implies; transformers reads the config")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("size", help="1.5b, 3b or 7b")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample", type=Path, default=SAMPLE_HF, help="folder whose tokenizer files are copied")
    ap.add_argument("--check", action="store_true", help="read it back with transformers + safetensors")
    args = ap.parse_args(argv)
    size = ALIASES.get(args.size.lower(), args.size.lower())
    if size not in SHAPES:
        ap.error(f"size {args.size!r}: expected one of {', '.join(SHAPES)}")
    write(size, args.out, args.seed, args.sample)
    if args.check:
        check(args.out, size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
