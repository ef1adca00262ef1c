"""Activation ranges of the 0.5B sample: can it run with float16 activations (max 65504)? Not run in CI.
About 5 minutes on 2 idle cores (CPU float16 matmuls are slow: that pass is about half of it).

    .venv/bin/python tests/bench/activations.py [--tokens 480]

Loads models/qwen2.5-coder-0.5b-instruct-hf with transformers' Qwen2ForCausalLM in float32 (CPU, 2 threads,
eager attention) and runs five texts of ~480 tokens each: English prose (tests/data/prose.txt), Python code
(tests/data/code.txt), Chinese prose (inline), a whitespace / repeated-token input, and a chat-templated
prompt (first token <|im_start|>). Forward hooks record, per layer, max |x| and the 99.99th percentile of |x|
of: the residual stream after each layer (Qwen2 is pre-norm, so it is the running sum), the input and output
of every RMSNorm (and the largest per-token sum of squares of the input, which is what an RMSNorm computing
its variance in float16 would overflow on), q/k/v_proj outputs (with bias), the attention logits q.k^T/sqrt(d)
after RoPE (and before, recomputed from the hooked q and k; causal entries only), o_proj output, gate_proj,
up_proj, silu(gate)*up (down_proj's input), down_proj output, and the final logits. Each max comes with its
text, token position, token and channel (for logits: head/key position), and the max over positions >= 1.

Then the whole forward runs again in float16 and in bfloat16 (model.half() / .bfloat16() on CPU; HF still
computes RMSNorm variance and softmax in float32, but rounds q.k^T to the run's type before the softmax), and
once in float32 with every nn.Linear's input and output rounded to float16 (float16 matmuls, float32 residual
stream / norms): inf/NaN anywhere, max |final logit - float32 logit|, greedy (argmax) agreement over all
positions.
Writes tests/bench/results/activations.json and prints a markdown table.
"""
import argparse
import copy
import datetime
import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "models" / "qwen2.5-coder-0.5b-instruct-hf"
RESULTS = Path(__file__).resolve().parent / "results" / "activations.json"
F16_MAX = 65504.0

CHINESE = (
    "江南的春天来得很早。二月刚过，河边的柳树就冒出了嫩绿的新芽，田野里的油菜花也一片接一片地开了。清"
    "晨，薄雾笼罩着小镇，石板路上还留着夜里的露水。老人们坐在茶馆里，一边喝着刚炒好的新茶，一边谈论今"
    "年的收成。孩子们背着书包，沿着河岸跑向学校，笑声惊起了芦苇丛里的白鹭。到了中午，阳光变得温暖起来"
    "，渔民们把小船划到河中央，撒下渔网，等待傍晚的收获。镇上的手艺人也忙碌起来：木匠在院子里刨木头，"
    "铁匠的炉火烧得通红，裁缝铺里传出缝纫机嗒嗒的声音。傍晚时分，炊烟从家家户户的屋顶升起，饭菜的香味"
    "飘满了整条街道。人们常说，生活的滋味就藏在这些平凡的日子里。写程序也是一样：先把问题想清楚，再一"
    "步一步地实现，最后认真测试每一个细节。一个好的函数应该只做一件事，名字要清楚，参数要少，出错的时"
    "候要给出明确的提示。代码写完以后，还要请同事帮忙审阅，因为别人的眼睛常常能发现自己看不到的问题。"
    "学习一门新的编程语言，最好的办法是动手去写：从打印一行字开始，然后读取文件、处理数据、画出图表，"
    "慢慢地就熟悉了。遇到困难不要着急，查一查文档，看一看别人的例子，问题总会解决的。夜深了，小镇安静"
    "下来，只有河水还在轻轻地流着，仿佛在讲述一个很长很长的故事。明天，太阳照常升起，新的一天又将开始"
    "。"
)
REPEAT = ("def f():\n" + "        \n" * 40 + " the" * 120 + "\n\n\n\n" * 20 + "\t\t\t\t" * 30
          + "0 " * 120 + "=" * 200 + "\n" + "    pass\n" * 40)
QUANTS = ["embed", "residual", "ln1_in", "ln1_sumsq", "ln1_out", "q", "k", "v", "attn_logit", "attn_logit_prerope",
          "o_proj", "ln2_in", "ln2_sumsq", "ln2_out", "gate", "up", "act_mul", "down", "final_norm_in",
          "final_norm_sumsq", "final_norm_out", "logits"]


def texts(tok, n):
    prose = (ROOT / "tests/data/prose.txt").read_text()
    code = (ROOT / "tests/data/code.txt").read_text()
    chat = tok.apply_chat_template([{"role": "user", "content": "Summarize this essay:\n\n" + prose[:1500]}],
                                   tokenize=False, add_generation_prompt=True)  # default system prompt first
    out = {}
    for name, t in [("prose", prose), ("code", code), ("chinese", CHINESE * 2), ("repeat_ws", REPEAT), ("chat", chat)]:
        out[name] = torch.tensor([tok(t)["input_ids"][:n]])
    return out


def stats(x, tok_ids, tok, chan_fmt=None):
    """x: (T, C) (T = token / query position): max |x|, p99.99, where, max over positions >= 1.
    With chan_fmt (attention logits) exact zeros are the masked (non-causal) entries: left out of p99.99."""
    a = x.detach().float().abs().reshape(x.shape[0], -1)
    flat = a.reshape(-1)
    i = int(flat.argmax())
    pos, ch = divmod(i, a.shape[1])
    vals = flat[flat != 0] if chan_fmt else flat
    k = max(1, math.ceil(0.9999 * vals.numel()))
    return {"max": float(flat[i]), "p9999": float(vals.kthvalue(k).values), "pos": pos,
            "token": tok.decode([int(tok_ids[pos])]), "channel": chan_fmt(ch) if chan_fmt else ch,
            "max_pos_ge1": float(a[1:].max()) if a.shape[0] > 1 else None}


def attn_logits(q, k, cos, sin, nh, nkv, hd, rope):
    T = q.shape[0]
    q = q.view(1, T, nh, hd).transpose(1, 2)
    k = k.view(1, T, nkv, hd).transpose(1, 2)
    if rope:
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(nh // nkv, dim=1)
    lg = (q @ k.transpose(-1, -2))[0] / math.sqrt(hd)  # (heads, Tq, Tk)
    lg = lg.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), 0.0)
    return lg.permute(1, 0, 2).reshape(T, -1)  # (Tq, heads*Tk), channel = head*T + kpos


def measure(model, ids, tok):
    """One float32 forward with hooks; {quantity: [stats per layer]} (embed / final_* / logits: one entry)."""
    cfg, T = model.config, ids.shape[1]
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // nh
    pos = torch.arange(T)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
    rec, qk, hooks = defaultdict(list), {}, []
    st = lambda x, f=None: stats(x[0] if x.dim() == 3 else x, ids[0], tok, f)  # noqa: E731
    kfmt = lambda c: f"h{c // T}/k{c % T}"  # noqa: E731

    def norm_hook(name):
        def h(mod, inp, out):
            x = inp[0][0]
            rec[name + "_in"].append(st(x))
            rec[name + "_sumsq"].append(st(x.pow(2).sum(-1, keepdim=True)))
            rec[name + "_out"].append(st(out))
        return h

    def out_hook(name):
        return lambda mod, inp, out: rec[name].append(st(out[0] if isinstance(out, tuple) else out))

    def qk_hook(name):
        def h(mod, inp, out):
            qk[name] = out[0]
            rec[name].append(st(out))
        return h

    def down_hook(mod, inp, out):
        rec["act_mul"].append(st(inp[0]))
        rec["down"].append(st(out))
        q, k = qk["q"], qk["k"]
        rec["attn_logit"].append(st(attn_logits(q, k, cos, sin, nh, nkv, hd, True), kfmt))
        rec["attn_logit_prerope"].append(st(attn_logits(q, k, cos, sin, nh, nkv, hd, False), kfmt))

    hooks.append(model.model.embed_tokens.register_forward_hook(out_hook("embed")))
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        hooks += [layer.input_layernorm.register_forward_hook(norm_hook("ln1")),
                  layer.post_attention_layernorm.register_forward_hook(norm_hook("ln2")),
                  a.q_proj.register_forward_hook(qk_hook("q")), a.k_proj.register_forward_hook(qk_hook("k")),
                  a.v_proj.register_forward_hook(out_hook("v")), a.o_proj.register_forward_hook(out_hook("o_proj")),
                  m.gate_proj.register_forward_hook(out_hook("gate")), m.up_proj.register_forward_hook(out_hook("up")),
                  m.down_proj.register_forward_hook(down_hook), layer.register_forward_hook(out_hook("residual"))]
    hooks += [model.model.norm.register_forward_hook(norm_hook("final_norm")),
              model.lm_head.register_forward_hook(out_hook("logits"))]
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return dict(rec), logits


def compare(model, ids, ref_logits):
    with torch.no_grad():
        out = model(ids, use_cache=False, output_hidden_states=True)
    hs = out.hidden_states
    lg = out.logits[0].float()
    bad = any(not torch.isfinite(h).all() for h in hs) or not torch.isfinite(lg).all()
    # residual_max: hs[:-1] = the embeddings and layers 0..22's outputs (hs[-1] is after the final norm)
    return {"nonfinite": bool(bad), "residual_max": max(float(h.float().abs().max()) for h in hs[:-1]),
            "logit_max_abs_diff": float((lg - ref_logits).abs().max()),
            "greedy_agree": float((lg.argmax(-1) == ref_logits.argmax(-1)).float().mean()), "positions": len(lg)}


def round_linears_f16(model):
    """Every nn.Linear takes and gives float16-rounded values (matmul in float16; the rest float32)."""
    r = lambda t: t.half().float()  # noqa: E731
    return [h for m in model.modules() if isinstance(m, torch.nn.Linear)
            for h in (m.register_forward_pre_hook(lambda mod, inp: (r(inp[0]),)),
                      m.register_forward_hook(lambda mod, inp, out: r(out)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=480)
    args = ap.parse_args()
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(CKPT)
    model = Qwen2ForCausalLM.from_pretrained(CKPT, dtype=torch.float32, attn_implementation="eager").eval()
    inputs = texts(tok, args.tokens)
    per_layer, refs = {q: {} for q in QUANTS}, {}
    for name, ids in inputs.items():
        rec, refs[name] = measure(model, ids, tok)
        for q, rows in rec.items():  # keep, per layer, the text with the largest max
            for layer, s in enumerate(rows):
                if layer not in per_layer[q] or s["max"] > per_layer[q][layer]["max"]:
                    per_layer[q][layer] = dict(s, text=name)
    precision = {}
    for label, dtype in [("float16", torch.float16), ("bfloat16", torch.bfloat16)]:
        m = copy.deepcopy(model).to(dtype)
        precision[label] = {n: compare(m, ids, refs[n]) for n, ids in inputs.items()}
        del m
    hooks = round_linears_f16(model)
    precision["float16_linears_only"] = {n: compare(model, ids, refs[n]) for n, ids in inputs.items()}
    for h in hooks:
        h.remove()

    summary = {}
    for q in QUANTS:
        layer, s = max(per_layer[q].items(), key=lambda kv: kv[1]["max"])
        summary[q] = dict(s, layer=layer if len(per_layer[q]) > 1 else None, headroom=F16_MAX / s["max"],
                          max_pos_ge1_all_layers=max(r["max_pos_ge1"] or 0 for r in per_layer[q].values()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "checkpoint": str(CKPT.relative_to(ROOT)),
        "texts": {n: int(ids.shape[1]) for n, ids in inputs.items()}, "float16_max": F16_MAX,
        "notes": "attn_logit: after RoPE, scaled by 1/sqrt(head_dim), causal entries; channel = head/key position. "
                 "*_sumsq: per-token sum of squares of the RMSNorm input. layer: index in model.model.layers "
                 "(embed / final_* / logits: one entry, layer null in summary). Per layer: the text with the "
                 "largest max. max_pos_ge1: the max over token positions >= 1 (without the attention-sink token 0).",
        "summary": summary, "per_layer": {q: [per_layer[q][i] for i in sorted(per_layer[q])] for q in QUANTS},
        "precision": precision}, indent=1, ensure_ascii=False))

    print("| quantity | max |x| | layer | text | pos | token | channel | p99.99 | max at pos>=1 | headroom |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for q, s in summary.items():
        layer = "-" if s["layer"] is None else s["layer"]
        print(f"| {q} | {s['max']:.4g} | {layer} | {s['text']} | {s['pos']} | {s['token']!r} | {s['channel']} "
              f"| {s['p9999']:.4g} | {s['max_pos_ge1_all_layers']:.4g} | {s['headroom']:.3g} |")
    print("\n| run | text | inf/NaN | max residual | max logit diff | greedy agree |\n|---|---|---|---|---|---|")
    for label, rows in precision.items():
        for n, r in rows.items():
            print(f"| {label} | {n} | {r['nonfinite']} | {r['residual_max']:.4g} | {r['logit_max_abs_diff']:.3g} "
                  f"| {r['greedy_agree']:.4f} |")


if __name__ == "__main__":
    main()
