"""`qwen-edge` command line: each command is a few lines over the library.

Bad input (a QwenEdgeError or a click usage error) prints one line `error: ...` and exits with 2; the
machine's fault (OSError such as a full disk, MemoryError) and any other exception (a bug) print one line
`error: <type>: <text>` and exit with 1. No traceback reaches the user.
"""
import json
import sys
import time
import warnings

import click

from toolkit.errors import ArgumentError, QwenEdgeError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qwen-edge")
def cli():
    """Quantized Qwen2 models for the edge: export to ONNX, then run them with ONNX Runtime."""


@cli.command("export")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--bits", type=click.Choice(["4", "8", "32"]), default="4", show_default=True,
              help="4 or 8: MatMulNBits weights; 32: float32 (the reference)")
@click.option("--preset", type=click.Choice(["fast", "balanced", "accurate"]), default=None,
              help="int4 recipe, a point of the measured front (README, \"The int4 front\"): fast = groups of 128 "
                   "and an int4 lm_head (fewest bytes per token); balanced = groups of 64 and an int4 lm_head (the "
                   "default); accurate = groups of 32 and an int8 lm_head (lowest KL, slowest). All are GPTQ-"
                   "compensated and asymmetric; the options below override a preset's choices")
@click.option("--group-size", type=int, default=None,
              help="weights per scale along the input dimension (power of two, 16..256; default: the preset's at "
                   "4 bits, 32 at 8)")
@click.option("--asymmetric/--symmetric", default=None,
              help="per-group zero points or not (default: asymmetric at 4 bits, symmetric at 8)")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="MatMulNBits compute of the int4 matrices: 0 exact float32, 4 int8 activations (faster on "
                   "CPU; the default at 4 bits); 8-bit matrices always use 4")
@click.option("--method", type=click.Choice(["rtn", "search", "calibrated", "compensated"]), default=None,
              help="rtn: round to nearest; search: least-squares scale search per group; calibrated: the search "
                   "weighted by activations of the float model on a calibration text; compensated: GPTQ, each "
                   "matrix quantized column by column with the rounding error pushed onto the columns not yet "
                   "quantized, layer by layer on the calibration text (slower export) "
                   "(default: the preset's, compensated, at 4 bits; rtn at 8)")
@click.option("--lm-head-bits", type=click.Choice(["4", "8"]), default=None,
              help="bits of the lm_head (and of a tied embedding); default: the preset's at 4 bits, else --bits")
@click.option("--embed-bits", type=click.Choice(["4", "8"]), default=None,
              help="bits of an untied embedding table; default: --bits")
@click.option("--lm-head-group-size", type=int, default=None,
              help="group size of the lm_head (and of a tied embedding); default: the preset's at 4 bits, else --group-size")
@click.option("--embed-group-size", type=int, default=None,
              help="group size of an untied embedding; default: 64 at 4 bits, else --group-size")
@click.option("--calibration", type=click.Path(path_type=str), default=None,
              help="UTF-8 text for --method calibrated or compensated (default: the text shipped with qwen-edge)")
@click.option("--ops", type=click.Choice(["fast", "portable"]), default="fast", show_default=True,
              help="fast: onnxruntime's contrib ops (MatMulNBits, GroupQueryAttention, ...); portable: standard "
                   "ONNX only (opset 21: DequantizeLinear, MatMul, standard attention)")
@click.option("--kv-cache", type=click.Choice(["float32", "int8"]), default="float32", show_default=True,
              help="int8: the KV cache in int8 with per-channel scales calibrated on the calibration text "
                   "(a quarter of the cache's memory; faster decode at long contexts, slower prefill)")
@click.option("--device", type=click.Choice(["cpu", "cuda", "dml"]), default="cpu", show_default=True,
              help="the execution provider the graphs are built for: cuda and dml get float16 activations and "
                   "KV cache (they also run, slower, on the CPU provider)")
@click.option("--prefill", type=click.Choice(["nbits", "int8"]), default="nbits", show_default=True,
              help="int8: also store an int8 copy of every layer matrix, and run prompts of at least "
                   "--prefill-threshold tokens on the CPU's int8 GEMM (VNNI / AMX): faster time to first token on "
                   "long prompts, at the cost of the copies on disk and in memory (the 0.5B: +344 MB); fast CPU only")
@click.option("--prefill-threshold", type=int, default=None,
              help="with --prefill int8: prompt tokens from which a call takes the int8 path (default 64)")
@click.option("--untie", is_flag=True,
              help="a checkpoint with tied embeddings (the 0.5B to 3B): store the lm_head apart from the embedding "
                   "table, so that it is quantized as a matrix of its own (GPTQ with --method compensated); one more "
                   "table on disk (the 0.5B: +~75 MB at int4), the same bytes read per token")
@click.option("--force", is_flag=True, help="replace OUT if it exists")
def export_cmd(src, out, bits, preset, group_size, asymmetric, accuracy_level, method, lm_head_bits, embed_bits,
               lm_head_group_size, embed_group_size, calibration, ops, kv_cache, device, prefill, prefill_threshold,
               untie, force):
    """Convert SRC (a Hugging Face Qwen2 folder or a GGUF file) into the model folder OUT."""
    try:
        from export import QuantSpec, export
    except ImportError as e:
        raise ArgumentError(f"export needs the converter's extra ({e.name} is missing): "
                            "pip install 'qwen-edge[export]'") from None
    from pathlib import Path

    spec = QuantSpec.recommended(int(bits), preset=preset, group_size=group_size, accuracy_level=accuracy_level,
                                 symmetric=None if asymmetric is None else not asymmetric, method=method,
                                 lm_head_bits=lm_head_bits and int(lm_head_bits),
                                 embed_bits=embed_bits and int(embed_bits), lm_head_group_size=lm_head_group_size,
                                 embed_group_size=embed_group_size)
    export(Path(src), Path(out), spec, force=force, calibration=calibration and Path(calibration), ops=ops,
           kv_cache=kv_cache, device=device, prefill=prefill, prefill_threshold=prefill_threshold, untie=untie)


def model_options(f):
    f = click.option("--prepack-cache", is_flag=True,
                     help="CPU: save onnxruntime's prepacked weights on the first load (under ~/.cache/qwen-edge "
                          "or $QWEN_EDGE_CACHE) and map them on later loads: a 7B loads in seconds, at about "
                          "twice the weights' bytes on disk")(f)
    f = click.option("--threads", type=int, default=None, help="CPU threads (default: onnxruntime's)")(f)
    f = click.option("--max-length", type=int, default=4096, show_default=True,
                     help="context budget: prompt plus new tokens")(f)
    return click.option("--provider", type=click.Choice(["cpu", "cuda", "dml", "auto"]), default="cpu",
                        show_default=True)(f)


def sampling_options(f=None, max_new_tokens=256):
    """The sampling options; `max_new_tokens`: the --max-new-tokens default (None: no cap)."""
    if f is None:
        return lambda f: sampling_options(f, max_new_tokens)
    for name, typ, text in (("--top-p", float, "nucleus sampling mass, in (0, 1]"),
                            ("--min-p", float, "keep the tokens at least this many times as likely as the most "
                                               "likely one, in [0, 1] (0: off)"),
                            ("--top-k", int, "keep the k most likely tokens (0: all)"),
                            ("--temperature", float, "0 is greedy (default: the model's generation_config)"),
                            ("--repetition-penalty", float, "1 is off"),
                            ("--seed", int, "makes sampling reproducible")):
        f = click.option(name, type=typ, default=None, help=text)(f)
    f = click.option("--lookup", type=int, default=0, show_default=True,
                     help="greedy only: draft up to N tokens per step by prompt lookup, verified in one call "
                          "(same output, faster when the answer repeats the prompt, e.g. editing code)")(f)
    if max_new_tokens is None:
        return click.option("--max-new-tokens", type=int, default=None,
                            help="cap the new tokens of each answer (default: none, an answer runs to its "
                                 "end-of-turn token within --max-length)")(f)
    return click.option("--max-new-tokens", type=int, default=max_new_tokens, show_default=True)(f)


def draft_options(f):
    f = click.option("--draft-tokens", type=click.IntRange(1, 16), default=8, show_default=True,
                     help="with --draft: the most tokens drafted per step (k starts at 4 or less and adapts)")(f)
    return click.option("--draft", default=None, type=click.Path(path_type=str),
                        help="a smaller model folder with the same tokenizer that proposes tokens for MODEL to "
                             "verify in one call (speculative decoding: greedy output unchanged, sampling "
                             "from MODEL's distribution)")(f)


def check_draft_and_lookup(draft, lookup) -> None:
    if draft and lookup:
        raise ArgumentError("--draft and --lookup: use one or the other")


def load_model(model, provider, threads, max_length, draft=None, draft_tokens=8, prepack_cache=False):
    from toolkit.model import load

    return load(model, provider=provider, threads=threads, max_length=max_length, draft=draft,
                draft_tokens=draft_tokens, prepack_cache=prepack_cache)


@cli.command()
@click.argument("model", type=click.Path(path_type=str))
@click.argument("prompt")
@sampling_options
@model_options
@click.option("--stop", multiple=True, help="stop at this text (repeatable)")
@click.option("--raw", is_flag=True, help="send PROMPT as is, without the chat template")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object: token ids and text")
@draft_options
def generate(model, prompt, max_new_tokens, lookup, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop,
             raw, as_json, provider, threads, max_length, prepack_cache, draft, draft_tokens):
    """Answer PROMPT with the model folder MODEL (streamed to stdout)."""
    check_draft_and_lookup(draft, lookup)
    m = load_model(model, provider, threads, max_length, draft, draft_tokens, prepack_cache)
    chat = prompt if raw else [{"role": "user", "content": prompt}]
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repetition_penalty=repetition_penalty, seed=seed, stop=stop, lookup=lookup)
    if as_json:
        c = m.complete([chat], **options)[0]
        out = {"prompt_ids": c.prompt_ids, "token_ids": c.token_ids, "text": c.text, "finish_reason": c.finish_reason}
        if draft:
            out["draft"] = {"drafted_tokens": c.stats.drafted_tokens, "accepted_tokens": c.stats.accepted_tokens}
        click.echo(json.dumps(out, ensure_ascii=False))
        return
    for piece in m.stream(chat, **options):
        click.echo(piece, nl=False)
    click.echo()


@cli.command()
@click.argument("model", type=click.Path(path_type=str))
@sampling_options(max_new_tokens=None)
@model_options
@click.option("--system", default=None, help="system prompt")
@draft_options
def chat(model, max_new_tokens, lookup, temperature, top_k, top_p, min_p, repetition_penalty, seed, provider, threads,
         max_length, prepack_cache, system, draft, draft_tokens):
    """Chat with MODEL in the terminal: streaming, multi-turn memory; /reset, /system, /stats, /exit."""
    from toolkit.chat import run_chat

    check_draft_and_lookup(draft, lookup)
    m = load_model(model, provider, threads, max_length, draft, draft_tokens, prepack_cache)
    run_chat(m, system=system, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
             min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, lookup=lookup)


@cli.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON")
@click.option("--verify", is_flag=True, help="also check every file's sha256")
def inspect(model, as_json, verify):
    """Show what the model folder MODEL holds, from its manifest."""
    from toolkit.inspect import describe
    from toolkit.manifest import read_manifest

    manifest = read_manifest(model)
    manifest.check_files(hashes=verify)
    click.echo(json.dumps(manifest.data, indent=2, ensure_ascii=False) if as_json else describe(manifest))
    if verify:
        click.echo(f"all {len(manifest['files'])} files match their sha256")


@cli.command("eval")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--text", "text_file", required=True, type=click.Path(path_type=str), help="UTF-8 text to score")
@click.option("--reference", default=None, type=click.Path(path_type=str),
              help="another export of the same checkpoint (usually --bits 32): adds KL, top-1, PPL ratio")
@click.option("--window", type=int, default=512, show_default=True, help="tokens of context per scoring call")
@click.option("--stride", type=int, default=256, show_default=True, help="tokens the window advances by")
@click.option("--threads", type=int, default=None, help="CPU threads (default: onnxruntime's)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def eval_cmd(model, text_file, reference, window, stride, threads, as_json):
    """Perplexity of MODEL on a text; with --reference, KL divergence and top-1 agreement too."""
    from toolkit.evaluate import evaluate_text, windows
    from toolkit.model import load
    from toolkit.textfile import read_text_file

    text = read_text_file(text_file, "--text")
    m = load(model, threads=threads, preload=False)
    ref = load(reference, threads=threads, preload=False) if reference else None
    n = len(m.tokenizer.encode(text))
    windows(n, window, stride)  # bad window/stride or too short a text: say so before the progress bar
    with click.progressbar(length=max(n - 1, 0), label="scoring", file=sys.stderr) as bar:
        report = evaluate_text(m, text, ref, window, stride, progress=bar.update)
    if as_json:
        click.echo(json.dumps(report))
        return
    for key, value in report.items():
        click.echo(f"{key:16} {value:.6g}" if isinstance(value, float) else f"{key:16} {value}")


@cli.command("bench")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--prompt-tokens", type=int, default=128, show_default=True)
@click.option("--new-tokens", type=int, default=128, show_default=True)
@click.option("--runs", type=int, default=3, show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads (default: onnxruntime's)")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "dml", "auto"]), default="cpu", show_default=True)
@click.option("--prepack-cache", is_flag=True, help="load through the prepacked-weights cache (see generate)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_cmd(model, prompt_tokens, new_tokens, runs, threads, provider, prepack_cache, as_json):
    """Speed and memory of MODEL: load, first token, prefill and decode tok/s, peak RSS, size."""
    from toolkit.bench import bench, format_report

    report = bench(model, prompt_tokens, new_tokens, runs, threads, provider, prepack_cache=prepack_cache)
    click.echo(json.dumps(report) if as_json else format_report(report))


@cli.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (loopback by default)")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="QWEN_EDGE_API_KEY", default=None,
              help="require 'Authorization: Bearer KEY' (or set QWEN_EDGE_API_KEY)")
@click.option("--model-id", default=None, help="the model name in responses (default: the folder's name)")
@click.option("--max-queue", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="requests that may wait for the one running; more get 503")
@click.option("--max-tokens", type=click.IntRange(1), default=1024, show_default=True,
              help="new tokens of a request that names none, and the most one may ask for (more: 400)")
@click.option("--request-timeout", type=click.FloatRange(0, min_open=True), default=300, show_default=True,
              help="seconds a request may generate; then it gets the answer so far (finish_reason length)")
@click.option("--max-body", type=click.IntRange(1024), default=1 << 20, show_default=True,
              help="largest request body in bytes; more gets 413")
@model_options
@draft_options
def serve(model, host, port, api_key, model_id, max_queue, max_tokens, request_timeout, max_body, provider, threads,
          max_length, prepack_cache, draft, draft_tokens):
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models)."""
    try:
        from toolkit.server import serve as run_server
    except ImportError as e:
        raise ArgumentError(f"serve needs the server's extra ({e.name} is missing): "
                            "pip install 'qwen-edge[serve]'") from None
    from pathlib import Path

    m = load_model(model, provider, threads, max_length, draft, draft_tokens, prepack_cache)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    run_server(m, model_id or Path(model).resolve().name, host=host, port=port, api_key=api_key,
               max_queue=max_queue, max_tokens=max_tokens, request_timeout=request_timeout, max_body=max_body,
               log=lambda msg: click.echo(msg, err=True))


def main(argv=None) -> None:
    """Entry point: runs the CLI and turns every exception into one line on stderr: exit status 2 for bad
    input, 1 for the machine's fault or a bug, 130 for Ctrl-C."""
    started = time.time()
    warnings.showwarning = lambda message, *args, **kwargs: click.echo(f"warning: {message}", err=True)
    try:
        cli.main(args=argv, prog_name="qwen-edge", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2)
    except QwenEdgeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted after {time.time() - started:.1f} s", err=True)
        sys.exit(130)
    except (OSError, MemoryError) as e:  # the machine's fault (disk full, no memory), not the input's
        click.echo(f"error: {type(e).__name__}: {one_line(e)}", err=True)
        sys.exit(1)
    except Exception as e:  # a bug: still one line, and where to report it
        click.echo(f"error: {type(e).__name__}: {one_line(e)} (a bug in qwen-edge: please report it to its "
                   "maintainers with this command line and the output of `qwen-edge --version`)", err=True)
        sys.exit(1)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "(no message)"
    return text if len(text) <= 500 else text[:497] + "..."


if __name__ == "__main__":
    main()
