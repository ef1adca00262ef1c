"""Tiny random Qwen2 checkpoints for tests: transformers' Qwen2 with a small BPE tokenizer trained here,
carrying Qwen's special tokens and ChatML chat template. Nothing is downloaded."""
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from export.gguf_checkpoint import QWEN2_SPLIT

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "def reverse(s):\n    return s[::-1]\n",
    "The quick brown fox jumps over the lazy dog. 你好，世界！ Héllo wörld 🙂🚀",
    "Write a Python function that reverses a string.",
    "import numpy as np\nx = np.arange(10)\nprint(x.sum())\n",
] * 20


def make_tokenizer(folder: Path, vocab_size: int = 300, chat_template: str = CHATML) -> Tokenizer:
    tok = Tokenizer(models.BPE())  # Qwen2's: NFC, its split regex, then byte-level BPE
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": chat_template, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
        "model_max_length": 512, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tok


def make_checkpoint(folder: Path, tied: bool, dtype: str = "float32", seed: int = 0, sharded: bool = False,
                    context: int = 512, chat_template: str = CHATML) -> Path:
    """Write a 2-layer Qwen2 (hidden 64, 4 heads / 2 KV heads, `context` positions) with tokenizer files to
    `folder`."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder, chat_template=chat_template)
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    cfg = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                      bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"], initializer_range=0.2)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms and biases, so those code paths carry signal too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder, max_shard_size="200KB" if sharded else "2GB")
    GenerationConfig(eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"],
                     do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                     repetition_penalty=1.05).save_pretrained(folder)
    return folder


def oracle(folder: Path):
    """transformers' Qwen2ForCausalLM in float32, loaded from the checkpoint folder."""
    import torch
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager").eval()


def write_gguf(folder: Path, path: Path, matrix_type: str = "F32", overrides: dict | None = None) -> Path:
    """Write the checkpoint in `folder` as a llama.cpp-style GGUF: qwen2 metadata, the tokenizer as
    tokenizer.ggml.* arrays, 2-D weights as `matrix_type` (F32, F16, Q8_0, Q4_0, …), the rest F32.
    `overrides` maps a GGUF tensor name to a numpy array stored as is (to test unsupported types)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from export.gguf_checkpoint import gguf_name

    cfg = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["id"] for t in tok["added_tokens"]}
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i in specials else 1 for _, i in vocab])
    merges = tok["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    w.add_eos_token_id(ids["<|im_end|>"])
    w.add_pad_token_id(ids["<|endoftext|>"])
    w.add_bos_token_id(ids["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(tok_cfg["chat_template"])
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    qtype = gguf.GGMLQuantizationType[matrix_type]
    for name, t in tensors.items():
        t = t.astype(np.float32) if t.dtype != np.uint16 else (t.astype(np.uint32) << 16).view(np.float32)
        gname = gguf_name(name)
        if overrides and gname in overrides:
            w.add_tensor(gname, overrides[gname])
        elif t.ndim == 2 and qtype not in (gguf.GGMLQuantizationType.F32,):
            w.add_tensor(gname, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
