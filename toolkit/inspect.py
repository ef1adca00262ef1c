"""A readable summary of a model folder's manifest (`qwen-edge inspect`)."""
from toolkit.manifest import Manifest, layer_name


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def describe(manifest: Manifest) -> str:
    m, q = manifest["model"], manifest["quantization"]
    kv = manifest["kv_cache"]
    if q["bits"] == 32:
        weights = "float32 (reference, not quantized)"
    else:
        weights = (f"int{q['bits']} {'symmetric' if q['symmetric'] else 'asymmetric'}, group {q['group_size']}, "
                   f"method {q.get('method', 'rtn')}, lm_head int{q.get('lm_head_bits') or q['bits']} "
                   f"group {q.get('lm_head_group_size') or q['group_size']}, "
                   f"accuracy_level {q['accuracy_level']}; "
                   f"{len(q['quantized_tensors'])} tensors quantized, {len(q['float_tensors'])} float; "
                   f"embedding via {q['embedding']}")
    lines = [
        f"folder      {manifest.folder}",
        f"model       {m['model_type']}: {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
        f"intermediate {m['intermediate_size']}, {m['num_attention_heads']} heads / {m['num_key_value_heads']} KV heads"
        f" x {m['head_dim']}, vocab {m['vocab_size']}, rope theta {m['rope_theta']:g}, "
        f"tied embeddings {m['tie_word_embeddings']}",
        f"weights     {weights}",
        f"            {manifest['weights_file']}: {mib(q['weights_bytes'])}",
        f"kv cache    {kv['dtype']} [batch, {kv['num_key_value_heads']}, length, {kv['head_dim']}] x "
        f"{2 * kv['num_layers']}: {layer_name(kv['past_key'], 'i')} -> {layer_name(kv['present_key'], 'i')}",
    ]
    for name, g in manifest["graphs"].items():
        ins = ", ".join(f"{v['name']}{v['shape']}" for v in g["inputs"][:2])
        logits = next((v for v in g.get("outputs", ()) if v["name"] == "logits"), {"shape": "?"})
        lines.append(f"graph       {name}: {g['file']} ({ins}, {len(g['inputs']) - 2} past KV -> logits"
                     f"{logits['shape']}, {len(g['outputs']) - 1} present KV)")
    lines += [
        f"context     {manifest.get('context_length')} tokens",
        f"end tokens  {manifest['eos_token_ids']}   pad {manifest.get('pad_token_id')}",
        f"sampling    {manifest.get('generation') or 'greedy'}",
        f"template    {'chat template present' if manifest.get('chat_template') else 'none (raw prompts only)'}",
        "files       " + ", ".join(f"{n} ({mib(f['bytes'])})" for n, f in manifest["files"].items()),
    ]
    return "\n".join(lines)
