"""Tiny random Qwen2 checkpoints for tests: transformers' Qwen2 with a small BPE tokenizer trained here,
carrying Qwen's special tokens and ChatML chat template. Nothing is downloaded."""
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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


def make_tokenizer(folder: Path, vocab_size: int = 300) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
        "model_max_length": 512, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tok


def make_checkpoint(folder: Path, tied: bool, dtype: str = "float32", seed: int = 0, sharded: bool = False) -> Path:
    """Write a 2-layer Qwen2 (hidden 64, 4 heads / 2 KV heads) with tokenizer files to `folder`."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    cfg = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
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
