"""The runtime: ONNX Runtime sessions over a model folder's graphs, plus tokenizer and sampling.

    model = toolkit.load("models/qwen-int4")
    print(model.generate([{"role": "user", "content": "Hi"}], max_new_tokens=64))
    for piece in model.stream("def fib(n):", max_new_tokens=64):
        print(piece, end="", flush=True)

Generation: one prefill call per prompt (a batch is then joined into one right-padded cache), then one call
per new token for the whole batch; the KV cache's buffers are bound through IO binding and the graphs write
into them (toolkit/kv_cache.py). By default one session (prefill.onnx) serves every call, so the prepacked
weights exist once in RAM; decode_graph=True runs the single-token steps through decode.onnx in a second
session instead. The per-sequence bookkeeping (sampling, text, stop) is in toolkit/generation.py; decoding with
a draft model (speculative decoding) in toolkit/speculative.py.
"""
import threading
import time
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime as ort

from toolkit.chat_template import ChatTemplate
from toolkit.constrained import compile_constraint
from toolkit.errors import ArgumentError, ContextOverflowError, ModelFolderError
from toolkit.generation import Completion, Row, Stats, prompt_lookup
from toolkit.kv_cache import KVCache
from toolkit.manifest import Manifest, layer_name, read_manifest
from toolkit.sampling import SamplingParams, make_sampler
from toolkit import device, prepack_cache, speculative
from toolkit.tokenizer import Tokenizer
from toolkit.tool_spec import tool_messages

MAX_STOPS, MAX_STOP_LENGTH = 16, 1000  # stop strings per call, characters per stop string


class Model:
    """A loaded model folder. Build it with `toolkit.load`.

    Threads: every call owns its KV cache and ONNX Runtime sessions are safe to run concurrently, so a
    Model may be used from several threads at once; calls then share the CPU cores (a server that wants
    one answer at a time serializes them, as `qwen-edge serve` does). A ChatSession is one conversation:
    it takes one turn at a time."""

    def __init__(self, folder, provider: str = "cpu", threads: int | None = None, max_length: int | None = None,
                 verify: bool = False, preload: bool = True, decode_graph: bool = False, draft=None,
                 draft_tokens: int = speculative.K_DEFAULT, spin: bool | None = None, prepack_cache=False):
        """See `load`. spin: let onnxruntime's worker threads spin-wait between calls (faster for one model
        alone); default: on, unless a draft is given (see `_stop_spinning`)."""
        self.draft_tokens = speculative.check_draft_tokens(draft_tokens)
        self.manifest: Manifest = read_manifest(folder)
        self.manifest.check_files(hashes=verify)
        self.config = self.manifest["model"]
        self.vocab_size = self.config["vocab_size"]  # token ids are 0 .. vocab_size - 1 (the graph's embedding rows)
        self.tokenizer = Tokenizer(self.manifest.path(self.manifest["tokenizer"]["file"]))
        template = self.manifest.get("chat_template")
        specials = self.manifest["tokenizer"].get("special_tokens", {})
        self.chat_template = ChatTemplate(template, specials) if template else None
        self.eos_ids = frozenset(self.manifest["eos_token_ids"])
        self.pad_id = self.manifest.get("pad_token_id") or min(self.eos_ids, default=0)
        context = self.manifest.get("context_length") or self.config["max_position_embeddings"]
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ArgumentError(f"max_length {max_length}: expected an integer >= 2")
        self.max_length = min(max_length or context, context)
        self.defaults = self.manifest.get("generation", {})
        self._threads, self._spin = threads, draft is None if spin is None else spin
        self._options = self._session_options()
        self.provider = device.choose(provider, self.manifest.get("device", "cpu"), self.manifest.folder)
        self._providers = [device.PROVIDERS[self.provider]]
        self._prepack_root = prepack_cache_root(prepack_cache, self.provider)
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._load_lock = threading.Lock()
        # Single-token steps run through the prefill graph unless decode_graph: a second session would hold
        # a second prepacked copy of every MatMulNBits weight (onnxruntime prepacks per session).
        self.decode_graph = decode_graph
        if preload:  # so the first answer does not pay for loading
            self.session("prefill")
            if decode_graph:
                self.session("decode")
        # a draft folder is loaded with the same provider, threads, context budget and options
        self._load_options = dict(provider=provider, threads=threads, max_length=self.max_length, verify=verify,
                                  preload=preload, decode_graph=decode_graph, prepack_cache=prepack_cache)
        self._checked_drafts = weakref.WeakSet()  # per-call drafts already compared with this model
        self.draft: Model | None = None
        self.set_draft(draft)

    def _session_options(self) -> ort.SessionOptions:
        options = session_options(self._threads, spin=self._spin)
        if self.manifest.get("ops") == "portable":
            # onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits at one session-wide accuracy level
            level = self.manifest["quantization"].get("accuracy_level") or 0
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
        return options

    def _stop_spinning(self) -> None:
        """A target and its draft alternate call by call on the same cores: each session's worker threads
        must not spin-wait after a call (onnxruntime's default), or they take the cores from the other
        model's call (measured on 2 cores, int8 target + int4 draft: 33.4 -> 43.7 tok/s; plain decoding
        unchanged within noise). Re-opens the sessions already loaded, once."""
        if not self._spin:
            return
        self._spin = False
        self._options = self._session_options()
        with self._load_lock:
            for name in list(self._sessions):
                self._sessions[name] = self._open(name)

    def set_draft(self, draft) -> None:
        """Use `draft` (a model folder, loaded with this model's provider, threads and max_length; a loaded
        Model; or None for none) to propose tokens for every call that does not say otherwise (see
        toolkit/speculative.py). Raises ArgumentError if its tokenizer differs from this model's."""
        self.draft = speculative.resolve(self, draft, lambda folder: Model(folder, **self._load_options, spin=False))
        if self.draft is not None:
            self._checked_drafts.add(self.draft)
            self._stop_spinning()
            self.draft._stop_spinning()

    def _draft_for(self, draft) -> "Model | None":
        """The draft of one call: None means the model's own (set_draft), False none, else a loaded Model."""
        if draft is None:
            return self.draft
        if draft is False:
            return None
        if not isinstance(draft, Model):
            raise ArgumentError(f"draft {draft!r}: per call, expected a Model from toolkit.load or False (load a "
                                "draft folder once: toolkit.load(path, draft=FOLDER))")
        if draft not in self._checked_drafts:
            speculative.check_draft(self, draft)
            self._checked_drafts.add(draft)
            self._stop_spinning()
            draft._stop_spinning()
        return draft

    def session(self, name: str) -> ort.InferenceSession:
        """The ONNX Runtime session of graph `name` ("prefill" or "decode"), loaded on first use."""
        with self._load_lock:
            if name not in self._sessions:
                self._sessions[name] = self._open(name)
        return self._sessions[name]

    def _open(self, name: str) -> ort.InferenceSession:
        graph = self.manifest["graphs"].get(name)
        if graph is None:
            raise ModelFolderError(f"{self.manifest.folder}: has no {name!r} graph (re-export it with this "
                                   "version of qwen-edge)")
        path = self.manifest.path(graph["file"])
        session = self._load(path)
        self._check_graph(name, session, path)
        return session

    def _load(self, path: Path) -> ort.InferenceSession:
        try:
            if self._prepack_root is not None:
                return prepack_cache.open_session(
                    path, self.manifest.path(self.manifest["weights_file"]), self.manifest["files"],
                    self._session_options, self._providers, self._prepack_root,
                    settings={"provider": self._providers[0], "ops": self.manifest.get("ops"),
                              "accuracy_level": self.manifest["quantization"].get("accuracy_level")})
            return ort.InferenceSession(str(path), self._options, providers=self._providers)
        except Exception as e:  # onnxruntime raises its own exception types for a broken graph
            raise ModelFolderError(f"{path}: onnxruntime could not load it ({str(e).splitlines()[0]})") from None

    def _check_graph(self, name: str, session: ort.InferenceSession, path: Path) -> None:
        """The graph takes and returns what the manifest says: the token inputs, one past and present per layer
        (named by the kv_cache templates, with its KV heads, head_dim and dtype) and logits over vocab_size."""
        kv = self.manifest["kv_cache"]
        layers = range(kv["num_layers"])
        pasts = [layer_name(kv[k], i) for i in layers for k in ("past_key", "past_value")]
        presents = [layer_name(kv[k], i) for i in layers for k in ("present_key", "present_value")]
        inputs = {v.name: v for v in session.get_inputs()}
        outputs = {v.name: v for v in session.get_outputs()}
        dtype = {"float32": "tensor(float)", "float16": "tensor(float16)", "int8": "tensor(int8)"}[kv["dtype"]]
        shape = [kv["num_key_value_heads"], kv["head_dim"]]  # dimensions 1 and 3 of a past or present
        where = f"{path}: does not match {self.manifest.folder / 'qwen-edge.json'}"
        tokens = ["input_ids", "attention_mask"] + (["num_logits"] if name == "prefill" else [])
        if set(inputs) != set(tokens + pasts):
            raise ModelFolderError(f"{where}: its inputs are not {', '.join(tokens)} and the kv_cache pasts of "
                                   f"{kv['num_layers']} layers ({len(inputs)} inputs for {len(tokens + pasts)})")
        if not set(presents + ["logits"]) <= set(outputs):
            raise ModelFolderError(f"{where}: its outputs lack logits or the kv_cache presents")
        for v in [inputs[n] for n in pasts] + [outputs[n] for n in presents]:
            if v.type != dtype or len(v.shape) != 4 or not fixed(v.shape[1::2], shape):
                raise ModelFolderError(f"{where}: {v.name} is {v.type} {v.shape}; kv_cache says {kv['dtype']} "
                                       f"[batch, {shape[0]}, positions, {shape[1]}]")
        if not fixed(outputs["logits"].shape[-1:], [self.vocab_size]):
            raise ModelFolderError(f"{where}: logits are {outputs['logits'].shape}; model.vocab_size is "
                                   f"{self.vocab_size}")

    def new_cache(self, batch: int = 1) -> KVCache:
        """An empty KV cache for `batch` sequences (it grows as needed up to max_length)."""
        return KVCache(self.manifest["kv_cache"], batch, self.max_length, device=self.provider)

    def forward(self, graph: str, input_ids: np.ndarray, attention_mask: np.ndarray, cache: KVCache,
                num_logits: int = 1) -> np.ndarray:
        """One call of graph `graph` ("prefill" or "decode") on top of `cache`, which takes the presents.

        input_ids int64 [B, S]; attention_mask int64 [B, cache.length + S]. Returns logits float32: decode
        [B, vocab]; prefill [B, num_logits, vocab] for the last num_logits positions (S: every position)."""
        return self._step(graph, input_ids, attention_mask, cache, num_logits)

    # -- prompts ---------------------------------------------------------------------------------

    def encode(self, prompt, chat: bool | None = None, literal_content: bool = False, tools=None) -> list[int]:
        """Token ids of a prompt: a str is used as is (unless chat=True), a message list goes
        through the chat template, a list of ints is taken as token ids (each checked against the vocabulary).

        Special-token text (<|im_start|> …) in a str or in the template's output becomes the control token, as
        transformers and llama.cpp's server do. literal_content=True keeps it plain text inside the content of
        user and tool messages, so that what a user types cannot open or close turns (the template's own
        tokens stay control tokens; see ChatTemplate.render_pieces). An assistant message's tool_calls may be in
        OpenAI's form (arguments a JSON string; toolkit/tool_spec.py). tools: a chat's tools, in the form the
        chat template takes (tool_spec.check_tools checks OpenAI's)."""
        if isinstance(prompt, list) and prompt and all(isinstance(t, (int, np.integer)) for t in prompt):
            return self.check_ids(prompt)
        if isinstance(prompt, str) and not chat:
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (str, list)):
            raise ArgumentError(f"prompt: expected a str, a list of messages or a list of token ids, got "
                                f"{type(prompt).__name__}")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else tool_messages(prompt)
        if self.chat_template is None:
            raise ModelFolderError(f"{self.manifest.folder}: the model has no chat template; pass raw text")
        if literal_content:
            return self.tokenizer.encode_pieces(self.chat_template.render_pieces(messages, tools=tools))
        return self.tokenizer.encode(self.chat_template.render(messages, tools=tools))

    def check_ids(self, ids, what: str = "prompt") -> list[int]:
        """Token ids as a list of ints, each in [0, vocab_size); ArgumentError naming the first bad one."""
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ArgumentError(f"{what}: expected at least one token")
        if all(type(t) is int for t in ids) and 0 <= min(ids) and max(ids) < self.vocab_size:
            return list(ids)
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab_size:
                shown = int(t) if isinstance(t, np.integer) else t
                raise ArgumentError(f"{what}: token id {shown!r:.40} at position {i}: expected an integer from 0 to "
                                    f"{self.vocab_size - 1}")
        return [int(t) for t in ids]

    # -- generation ------------------------------------------------------------------------------

    def generate(self, prompt, **kwargs):
        """Generate text for a prompt (str), a chat (list of {"role", "content"}), or a batch (a list
        of either). Returns a str, or a list of str for a batch. See `complete` for the options."""
        batch = is_batch(prompt)
        done = self.complete(prompt if batch else [prompt], **kwargs)
        return [c.text for c in done] if batch else done[0].text

    def stream(self, prompt, literal_content: bool = False, **kwargs) -> Iterator[str]:
        """Yield the text of one prompt's answer piece by piece as it is decoded."""
        if is_batch(prompt):
            raise ArgumentError("stream: expected one prompt or one chat, not a batch")
        for _, piece in self.run([self.encode(prompt, literal_content=literal_content)], **kwargs):
            yield piece

    def chat(self, messages: list[dict], stream: bool = False, tools=None, tool_choice="auto",
             parallel_tool_calls: bool = True, **kwargs):
        """Answer a chat (a list of {"role", "content"}): the text, or with stream=True an iterator of
        its pieces. Each call prefills the whole chat; a ChatSession (`model.chat_session()`) keeps the
        KV cache between turns instead. Options as in `complete`.

        tools (OpenAI's [{"type": "function", "function": {"name", "description", "parameters"}}]) are
        rendered by the chat template, and the answer is a ToolAnswer (content, tool_calls, errors,
        finish_reason "tool_calls" when it calls), or with stream=True an iterator of content pieces (str)
        and finished ToolCalls; tool_choice and parallel_tool_calls as in OpenAI's API (toolkit/tool_spec.py).
        Append `answer.message()` and {"role": "tool", "content": result} messages to continue."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ArgumentError("messages: expected a list of {'role': ..., 'content': ...} dicts")
        if tools is not None:
            from toolkit.tool_chat import chat_with_tools

            return chat_with_tools(self, messages, stream, tools, tool_choice, parallel_tool_calls, **kwargs)
        if tool_choice != "auto" or parallel_tool_calls is not True:
            raise ArgumentError("tool_choice, parallel_tool_calls: need tools")
        return self.stream(messages, **kwargs) if stream else self.generate(messages, **kwargs)

    def chat_session(self, system: str | None = None, **defaults):
        """A multi-turn conversation that reuses its KV cache between turns (see toolkit.ChatSession)."""
        from toolkit.session import ChatSession

        return ChatSession(self, system=system, **defaults)

    def complete(self, prompts: list, max_new_tokens: int | None = 256, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None, stop=(), lookup: int = 0, draft=None, draft_tokens: int | None = None,
                 literal_content: bool = False, min_p: float | None = None, grammar: str | None = None,
                 json_schema=None) -> list[Completion]:
        """Generate for a list of prompts (str, message lists, or lists of token ids) as one batch.

        Sampling options default to the model's generation_config; temperature 0 is greedy; min_p keeps the
        tokens at least min_p times as likely as the most likely one (toolkit/sampling.py). Generation
        of a sequence ends at any of the model's end tokens, at a `stop` string, or after max_new_tokens
        (None: up to the context's end).
        grammar (a Lark grammar in llguidance's dialect) or json_schema (a dict or its JSON text) constrains
        the output: it always follows the grammar or validates against the schema, unless max_new_tokens cuts
        it first (finish_reason "length"); needs llguidance (toolkit/constrained.py). A constrained call
        decodes without a draft model (the model's own is skipped) and refuses lookup.
        lookup=N (one prompt, greedy only) drafts up to N tokens per step by prompt lookup and verifies
        them in one call: the same tokens as plain greedy, faster when the answer repeats its context
        (editing code, quoting).
        draft (one prompt; greedy or sampling): None uses the model's draft (`load(..., draft=FOLDER)` or
        `set_draft`), False decodes without one, a Model (same tokenizer) drafts for this call. The draft
        proposes up to draft_tokens (1-16, default the model's `draft_tokens`) tokens per step, verified in
        one call: greedy gives the target's own tokens (up to the rounding of quantized kernels in a
        near-tie), sampling draws from the target's distribution (toolkit/speculative.py).
        Completion.stats counts drafted and accepted tokens.
        literal_content=True: special-token text in user and tool messages stays plain text (see `encode`).
        """
        if not isinstance(prompts, list) or not prompts:
            raise ArgumentError("prompts: expected a non-empty list of prompts")
        ids = [self.encode(p, literal_content=literal_content) for p in prompts]
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty, seed=seed, stop=stop, lookup=lookup, draft=draft,
                       draft_tokens=draft_tokens, min_p=min_p, grammar=grammar, json_schema=json_schema)
        out = [Completion("", p) for p in ids]
        for row, piece in self.run(ids, collect=out, **options):
            out[row].text += piece
        return out

    def run(self, prompts: list[list[int]], max_new_tokens=256, temperature=None, top_k=None, top_p=None,
            repetition_penalty=None, seed=None, stop=(), lookup: int = 0, draft=None, draft_tokens=None,
            collect: list[Completion] | None = None, cache: KVCache | None = None,
            draft_cache: KVCache | None = None, stats: Stats | None = None, min_p=None, grammar=None,
            json_schema=None) -> Iterator[tuple[int, str]]:
        """The public low-level generation API (what `complete`, `stream`, ChatSession and the server use):
        generate for a batch of prompts given as token ids, yielding (row, text piece) as tokens are decoded.

        prompts: a list of token-id lists (each id in [0, vocab_size); `encode` makes them from text or a
        chat). Options as in `complete`. `collect`, if given, is a list with one Completion per prompt that
        takes each row's token ids, finish reason and (at the end) `stats`. `stats`: a Stats to fill in
        (timings, token counts, drafted/accepted tokens). `cache`, for one prompt only, holds the KV of the
        prompt's first `cache.length` tokens (a chat's earlier turns, kv_cache.PrefixCache): only the rest is
        prefilled, and the cache is extended in place, ending with every token fed to the model (the prompt
        and all generated tokens but the last). `draft_cache` is the same for the draft model (it may hold
        fewer tokens, or none). Bad prompts or options raise a QwenEdgeError when the iteration starts,
        before anything is generated (`check_options` checks options up front)."""
        if not isinstance(prompts, list) or not prompts:
            raise ArgumentError("prompts: expected a non-empty list of token-id lists")
        prompts = [self.check_ids(p) for p in prompts]
        o = self.check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, lookup,
                               draft, draft_tokens, min_p=min_p, grammar=grammar, json_schema=json_schema)
        params, lookup, draft, stop, constraint = o["params"], o["lookup"], o["draft"], o["stop"], o["constraint"]
        longest = max(len(p) for p in prompts)
        if longest >= self.max_length:
            raise ContextOverflowError(f"prompt: {longest} tokens do not fit max_length {self.max_length} "
                                       "(leave room for at least one new token)")
        max_new_tokens = min(o["max_new_tokens"] or self.max_length, self.max_length - longest)
        stats = stats if stats is not None else Stats()
        stats.prompt_tokens = longest

        batch = len(prompts)
        if lookup and batch > 1:
            raise ArgumentError("lookup: needs one prompt and greedy decoding (temperature 0)")
        if draft is not None and batch > 1:
            raise ArgumentError(f"draft: needs one prompt, not a batch of {batch} (pass draft=False to decode "
                                "the batch without it)")
        if collect is not None and len(collect) != batch:
            raise ArgumentError(f"collect: {len(collect)} Completions for {batch} prompts")
        if cache is not None and (batch > 1 or not 0 <= cache.length < longest):
            raise ArgumentError(f"cache: holds {cache.length} positions; expected one prompt of more tokens")
        # one generator per row (seed + row): rows of a batch draw independently and reproducibly
        rows = [Row(prompts[r], self.eos_ids, self.tokenizer, stop, collect[r] if collect else None,
                    make_sampler(params if params.seed is None else replace(params, seed=params.seed + r)),
                    constraint and constraint.matcher())
                for r in range(batch)]
        t = time.perf_counter()
        if cache is not None:
            stats.reused_tokens = cache.length
            mask = np.ones((1, longest), dtype=np.int64)
            logits = self._step("prefill", np.array([prompts[0][cache.length:]], dtype=np.int64), mask, cache)[:, -1]
        else:
            logits, mask, cache = self._prefill_rows(prompts)
        stats.prefill_seconds = time.perf_counter() - t
        t = time.perf_counter()
        if draft is not None:
            draft_cache = draft_cache if draft_cache is not None else draft.new_cache(1)
            yield from ((0, piece) for piece in speculative.speculative_loop(
                self, draft, rows[0], logits[0], cache, draft_cache, max_new_tokens, o["draft_tokens"], stats, t))
        elif lookup:
            yield from ((0, piece) for piece in self._lookup_loop(rows[0], logits[0], cache, max_new_tokens, lookup,
                                                                   stats, t))
        else:
            for step in range(max_new_tokens):
                next_ids = np.full((batch, 1), self.pad_id, dtype=np.int64)
                for r, row in enumerate(rows):
                    if row.alive:
                        next_ids[r, 0], piece = row.take(row.sample(logits[r]))
                        if piece:
                            yield r, piece
                stats.generated_tokens = step + 1
                if not any(row.alive for row in rows) or step == max_new_tokens - 1:
                    break
                mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
                logits = self._step("decode", next_ids, mask, cache)
                stats.decode_seconds = time.perf_counter() - t
        for r, row in enumerate(rows):
            if row.collect is not None:
                row.collect.stats = stats
            piece = row.flush()
            if piece:
                yield r, piece

    def _prefill_rows(self, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray, KVCache]:
        """Prefill each prompt alone, then join the rows into one right-padded batch cache: (last-position
        logits [B, V], attention_mask [B, longest], cache). A row's tokens must sit at its first cache
        positions (GroupQueryAttention reads lengths from the mask), so rows are not left-padded together."""
        caches, logits = [], []
        for p in prompts:
            cache = self.new_cache(1)
            ids = np.array([p], dtype=np.int64)
            logits.append(self._step("prefill", ids, np.ones_like(ids), cache)[:, -1])
            caches.append(cache)
        if len(prompts) == 1:
            return logits[0], np.ones((1, len(prompts[0])), dtype=np.int64), caches[0]
        longest = max(len(p) for p in prompts)
        mask = np.zeros((len(prompts), longest), dtype=np.int64)
        for r, p in enumerate(prompts):
            mask[r, :len(p)] = 1
        return np.concatenate(logits), mask, KVCache.join(caches, longest)

    def _lookup_loop(self, row: "Row", logits: np.ndarray, cache: KVCache, max_new_tokens: int, draft_max: int,
                     stats: Stats, started: float) -> Iterator[str]:
        """Greedy decoding with prompt-lookup drafts: after each token, the last n-gram of the sequence is
        looked up earlier in it; the tokens that followed it there are a draft, verified in one prefill call
        that returns logits for every draft position. The longest prefix of the draft that greedy decoding
        (with the repetition penalty, if any) would have produced is accepted, plus the token greedy picks
        after it; the cache is cut back to what was accepted. The output is the same as plain greedy
        decoding, token for token. One row, no padding: the attention mask is all ones."""
        generated = 0
        try:
            while True:
                token, piece = row.take(row.sample(logits))
                generated += 1
                if piece:
                    yield piece
                if not row.alive or generated >= max_new_tokens:
                    return
                budget = max_new_tokens - generated - 1  # draft tokens that could still be accepted
                draft = prompt_lookup(row.seen, min(draft_max, budget)) if budget > 0 else []
                fed = np.array([[token] + draft], dtype=np.int64)
                mask = np.ones((1, cache.length + fed.shape[1]), dtype=np.int64)
                if not draft:
                    logits = self._step("decode", fed, mask, cache)[0]
                    continue
                verified = self._step("prefill", fed, mask, cache, num_logits=fed.shape[1])[0]
                accepted = 0  # greedy's choice at each draft position, given the draft before it
                while accepted < len(draft) and row.sample(verified[accepted], draft[:accepted]) == draft[accepted]:
                    accepted += 1
                cache.truncate(cache.length - len(draft) + accepted)  # the rejected draft tokens leave the cache
                stats.drafted_tokens += len(draft)
                stats.accepted_tokens += accepted
                logits = verified[accepted]
                generated += yield from row.take_accepted(draft[:accepted])
                if not row.alive:
                    return
        finally:
            stats.generated_tokens = generated
            stats.decode_seconds = time.perf_counter() - started

    def _step(self, graph: str, input_ids: np.ndarray, mask: np.ndarray, cache: KVCache,
              num_logits: int = 1) -> np.ndarray:
        """Run one graph call; the cache takes the presents, the logits return (prefill: the last
        `num_logits` positions, [B, N, V]; decode: [B, V])."""
        one_token = graph == "decode" and not self.decode_graph  # a decode step through the prefill graph
        if one_token:
            graph, num_logits = "prefill", 1
        session = self.session(graph)
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", mask)
        if graph == "prefill":
            binding.bind_cpu_input("num_logits", np.array([num_logits], dtype=np.int64))
        binding.bind_output("logits")
        cache.bind(binding, input_ids.shape[1])
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # in bind order: logits, then the presents
        cache.advance(input_ids.shape[1], outputs[1:])
        logits = outputs[0].numpy()
        return logits[:, 0] if one_token else logits

    def check_options(self, max_new_tokens=256, temperature=None, top_k=None, top_p=None, repetition_penalty=None,
                      seed=None, stop=(), lookup=0, draft=None, draft_tokens=None, min_p=None, grammar=None,
                      json_schema=None) -> dict:
        """Check generation options (as `complete` takes them) without generating: ArgumentError naming the
        first bad one, else their values (params: SamplingParams, max_new_tokens (None: up to the context),
        stop: a tuple, lookup, draft: a Model or None, draft_tokens, constraint: a constrained.Constraint or
        None). `run` calls it; ChatSession calls it before changing anything."""
        params = self.sampling_params(temperature, top_k, top_p, repetition_penalty, seed, min_p)
        if type(lookup) is not int or not 0 <= lookup <= 64:
            raise ArgumentError(f"lookup {lookup!r:.40}: expected an integer from 0 (off) to 64 draft tokens")
        if max_new_tokens is not None and (type(max_new_tokens) is not int or max_new_tokens < 1):
            raise ArgumentError(f"max_new_tokens {max_new_tokens!r:.40}: expected an integer >= 1 (or None: up to "
                                "the context's end)")
        stop = (stop,) if isinstance(stop, str) else () if stop is None else stop
        if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOPS or not all(
                isinstance(s, str) and len(s) <= MAX_STOP_LENGTH for s in stop):
            raise ArgumentError(f"stop {stop!r:.60}: expected a string or a list of at most {MAX_STOPS} strings of "
                                f"at most {MAX_STOP_LENGTH} characters")
        if lookup and params.temperature != 0:
            raise ArgumentError("lookup: needs one prompt and greedy decoding (temperature 0)")
        constraint = compile_constraint(self, grammar, json_schema)
        if constraint is not None and (lookup or isinstance(draft, Model)):
            raise ArgumentError(f"{'grammar' if grammar is not None else 'json_schema'}: constrained output decodes "
                                f"without {'lookup' if lookup else 'a draft model'} (drafts are not checked against "
                                "the grammar)")
        draft = None if constraint is not None else self._draft_for(draft)  # not the model's own draft either
        if draft is not None and lookup:
            raise ArgumentError("draft and lookup: use one or the other (pass draft=False to use lookup)")
        draft_tokens = speculative.check_draft_tokens(self.draft_tokens if draft_tokens is None else draft_tokens)
        return dict(params=params, max_new_tokens=max_new_tokens, stop=tuple(stop), lookup=lookup, draft=draft,
                    draft_tokens=draft_tokens, constraint=constraint)

    def sampling_params(self, temperature=None, top_k=None, top_p=None, repetition_penalty=None,
                        seed=None, min_p=None) -> SamplingParams:
        """Explicit values, else the model's generation defaults, else greedy."""
        d = self.defaults
        if temperature is None:
            temperature = d.get("temperature", 0.0) if d.get("do_sample") else 0.0
        return SamplingParams(
            temperature=temperature,
            top_k=d.get("top_k", 0) if top_k is None else top_k,
            top_p=d.get("top_p", 1.0) if top_p is None else top_p,
            min_p=d.get("min_p", 0.0) if min_p is None else min_p,
            repetition_penalty=d.get("repetition_penalty", 1.0) if repetition_penalty is None else repetition_penalty,
            seed=seed).check()


def fixed(dims: list, wanted: list) -> bool:
    """A graph's dimensions are the wanted sizes, where they are fixed (a symbolic one matches anything)."""
    return len(dims) == len(wanted) and all(not isinstance(d, int) or d == w for d, w in zip(dims, wanted))


def is_batch(prompt) -> bool:
    """A batch is a list of prompts (str) or of chats (lists); a list of dicts is one chat."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)


def prepack_cache_root(setting, provider: str) -> Path | None:
    """Where `load`'s prepack_cache argument puts the cache (toolkit/prepack_cache.py), or None for none."""
    if setting is False or setting is None:
        return None
    if provider != "cpu":
        raise ArgumentError(f"prepack_cache: the saved prepacked weights are a CPU feature; provider is {provider!r}")
    if setting is True:
        return prepack_cache.default_root()
    if isinstance(setting, (str, Path)) and str(setting):
        return Path(setting)
    raise ArgumentError(f"prepack_cache {setting!r}: expected True (the default folder), a folder, or False")


def session_options(threads: int | None, spin: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ArgumentError(f"threads {threads}: expected an integer >= 1")
        options.intra_op_num_threads = threads
    return options


def load(path, provider: str = "cpu", threads: int | None = None, max_length: int | None = None,
         verify: bool = False, preload: bool = True, decode_graph: bool = False, draft=None,
         draft_tokens: int = speculative.K_DEFAULT, prepack_cache=False) -> Model:
    """Load an exported model folder.

    provider: "cpu", "cuda", "dml" or "auto" (the first of cuda, dml, cpu that this onnxruntime has and
    the folder was exported for; toolkit/device.py); threads: CPU threads (default: onnxruntime's choice); max_length:
    the context budget, prompt plus new tokens (default: the model's context length); verify: also check
    every file's sha256 (slower); preload: create the session(s) now rather than on first use;
    decode_graph: run single-token steps through decode.onnx in a second session instead of through the
    prefill graph (measured on the sample's CPU: the same decode speed, +0.8 s load and +360 MB RSS,
    because onnxruntime prepacks the weights once per session); draft: a smaller model folder (or a loaded
    Model) with the same tokenizer, loaded with the same options, that proposes tokens for this one to
    verify (speculative decoding, toolkit/speculative.py; per call `draft=False` turns it off); draft_tokens:
    the most tokens it proposes per step (1-16, default 8; k starts at min(4, draft_tokens) and adapts);
    prepack_cache: on the CPU, save onnxruntime's prepacked weights on the first load and map them on later
    loads (True: under ~/.cache/qwen-edge or $QWEN_EDGE_CACHE; or a folder): a 7B loads in seconds instead of
    tens of seconds, at the cost of about twice the weights' bytes on disk (toolkit/prepack_cache.py)."""
    return Model(Path(path), provider=provider, threads=threads, max_length=max_length, verify=verify,
                 preload=preload, decode_graph=decode_graph, draft=draft, draft_tokens=draft_tokens,
                 prepack_cache=prepack_cache)
