"""The runtime: a model folder's prefill and decode ONNX Runtime sessions plus tokenizer and sampling.

    model = toolkit.load("models/qwen-int4")
    print(model.generate([{"role": "user", "content": "Hi"}], max_new_tokens=64))
    for piece in model.stream("def fib(n):", max_new_tokens=64):
        print(piece, end="", flush=True)

Generation: one prefill call over the (left-padded) prompt batch, then one decode call per token, the
present KV OrtValues of each call bound as the next call's past through IO binding (no numpy copy).
"""
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime as ort

from toolkit.chat_template import ChatTemplate
from toolkit.errors import ArgumentError, ContextOverflowError, ModelFolderError
from toolkit.kv_cache import KVCache
from toolkit.manifest import Manifest, read_manifest
from toolkit.sampling import SamplingParams, make_sampler
from toolkit.tokenizer import TextStream, Tokenizer

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider"}


@dataclass
class Stats:
    """Timing of one generation call (for a batch, of the whole batch)."""

    prompt_tokens: int = 0  # prompt length (the longest row of a batch)
    reused_tokens: int = 0  # prompt tokens whose KV came from a cache (ChatSession), not prefilled
    prefill_seconds: float = 0.0  # prefill call: the time to the first token's logits
    generated_tokens: int = 0  # tokens sampled (per row, the longest)
    decode_seconds: float = 0.0  # every decode call after the prefill

    @property
    def prefill_tokens_per_second(self) -> float:
        return (self.prompt_tokens - self.reused_tokens) / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second of the decode calls (the first token comes from the prefill)."""
        return (self.generated_tokens - 1) / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class Completion:
    """One generated sequence: its text, the token ids in and out, and why it ended."""

    text: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (end token or stop string) or "length"
    stats: Stats = field(default_factory=Stats)


class Model:
    """A loaded model folder. Build it with `toolkit.load`.

    Threads: every call owns its KV cache and ONNX Runtime sessions are safe to run concurrently, so a
    Model may be used from several threads at once; calls then share the CPU cores (a server that wants
    one answer at a time serializes them, as `qwen-edge serve` does). A ChatSession is one conversation:
    it takes one turn at a time."""

    def __init__(self, folder, provider: str = "cpu", threads: int | None = None, max_length: int | None = None,
                 verify: bool = False, preload: bool = True):
        self.manifest: Manifest = read_manifest(folder)
        self.manifest.check_files(hashes=verify)
        self.config = self.manifest["model"]
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
        self._options = session_options(threads)
        self._providers = [resolve_provider(provider)]
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._load_lock = threading.Lock()
        if preload:  # generation's two graphs, so the first answer does not pay for loading them
            self.session("prefill")
            self.session("decode")

    @property
    def prefill(self) -> ort.InferenceSession:
        return self.session("prefill")

    @property
    def decode(self) -> ort.InferenceSession:
        return self.session("decode")

    def session(self, name: str) -> ort.InferenceSession:
        """The ONNX Runtime session of graph `name` (prefill, decode; score is loaded on first use)."""
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
        try:
            return ort.InferenceSession(str(path), self._options, providers=self._providers)
        except Exception as e:  # onnxruntime raises its own exception types for a broken graph
            raise ModelFolderError(f"{path}: onnxruntime could not load it ({str(e).splitlines()[0]})") from None

    def new_cache(self, batch: int = 1) -> KVCache:
        """An empty KV cache for `batch` sequences."""
        return KVCache(self.manifest["kv_cache"], batch)

    def forward(self, graph: str, input_ids: np.ndarray, attention_mask: np.ndarray, cache: KVCache) -> np.ndarray:
        """One call of graph `graph` (prefill, decode or score) on top of `cache`, which takes the presents.

        input_ids int64 [B, S]; attention_mask int64 [B, cache.length + S]. Returns logits float32:
        [B, vocab] for the last position (prefill, decode) or [B, S, vocab] for every position (score)."""
        return self._step(self.session(graph), input_ids, attention_mask, cache)

    # -- prompts ---------------------------------------------------------------------------------

    def encode(self, prompt, chat: bool | None = None) -> list[int]:
        """Token ids of a prompt: a str is used as is (unless chat=True), a message list goes
        through the chat template, a list of ints is taken as token ids."""
        if is_token_ids(prompt):
            return [int(t) for t in prompt]
        if isinstance(prompt, str) and not chat:
            return self.tokenizer.encode(prompt)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if self.chat_template is None:
            raise ModelFolderError(f"{self.manifest.folder}: the model has no chat template; pass raw text")
        return self.tokenizer.encode(self.chat_template.render(messages))

    # -- generation ------------------------------------------------------------------------------

    def generate(self, prompt, **kwargs):
        """Generate text for a prompt (str), a chat (list of {"role", "content"}), or a batch (a list
        of either). Returns a str, or a list of str for a batch. See `complete` for the options."""
        batch = is_batch(prompt)
        done = self.complete(prompt if batch else [prompt], **kwargs)
        return [c.text for c in done] if batch else done[0].text

    def stream(self, prompt, **kwargs) -> Iterator[str]:
        """Yield the text of one prompt's answer piece by piece as it is decoded."""
        if is_batch(prompt):
            raise ArgumentError("stream: expected one prompt or one chat, not a batch")
        for _, piece in self._run([self.encode(prompt)], **kwargs):
            yield piece

    def chat(self, messages: list[dict], stream: bool = False, **kwargs):
        """Answer a chat (a list of {"role", "content"}): the text, or with stream=True an iterator of
        its pieces. Each call prefills the whole chat; a ChatSession (`model.chat_session()`) keeps the
        KV cache between turns instead. Options as in `complete`."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ArgumentError("messages: expected a list of {'role': ..., 'content': ...} dicts")
        return self.stream(messages, **kwargs) if stream else self.generate(messages, **kwargs)

    def chat_session(self, system: str | None = None, **defaults):
        """A multi-turn conversation that reuses its KV cache between turns (see toolkit.ChatSession)."""
        from toolkit.session import ChatSession

        return ChatSession(self, system=system, **defaults)

    def complete(self, prompts: list, max_new_tokens: int = 256, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None, stop=()) -> list[Completion]:
        """Generate for a list of prompts (str, message lists, or lists of token ids) as one left-padded batch.

        Sampling options default to the model's generation_config; temperature 0 is greedy. Generation
        of a sequence ends at any of the model's end tokens, at a `stop` string, or after max_new_tokens.
        """
        if not isinstance(prompts, list) or not prompts:
            raise ArgumentError("prompts: expected a non-empty list of prompts")
        ids = [self.encode(p) for p in prompts]
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty, seed=seed, stop=stop)
        out = [Completion("", p) for p in ids]
        for row, piece in self._run(ids, _collect=out, **options):
            out[row].text += piece
        return out

    def _run(self, prompts: list[list[int]], max_new_tokens=256, temperature=None, top_k=None, top_p=None,
             repetition_penalty=None, seed=None, stop=(), _collect=None, cache: KVCache | None = None,
             stats: Stats | None = None) -> Iterator[tuple[int, str]]:
        """Core loop: yields (row, text piece) as tokens are decoded.

        `cache`, for one prompt only, holds the KV of the prompt's first `cache.length` tokens (a chat's
        earlier turns): only the rest is prefilled, and the cache is extended in place, ending with every
        token fed to the model (the prompt and all generated tokens but the last)."""
        params = self.sampling_params(temperature, top_k, top_p, repetition_penalty, seed)
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if not all(isinstance(s, str) for s in stop):
            raise ArgumentError(f"stop {stop!r}: expected a string or a list of strings")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ArgumentError(f"max_new_tokens {max_new_tokens}: expected an integer >= 1")
        longest = max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ArgumentError("prompt: expected at least one token")
        if longest >= self.max_length:
            raise ContextOverflowError(f"prompt: {longest} tokens do not fit max_length {self.max_length} "
                                       "(leave room for at least one new token)")
        max_new_tokens = min(max_new_tokens, self.max_length - longest)
        stats = stats if stats is not None else Stats()
        stats.prompt_tokens = longest

        batch = len(prompts)
        # one generator per row (seed + row): rows of a batch draw independently and reproducibly
        samplers = [make_sampler(params if params.seed is None else replace(params, seed=params.seed + r))
                    for r in range(batch)]
        streams = [TextStream(self.tokenizer, stop) for _ in range(batch)]
        seen = [np.array(p, dtype=np.int64) for p in prompts]
        if cache is None:
            cache = KVCache(self.manifest["kv_cache"], batch)
            input_ids, mask = left_pad(prompts, self.pad_id)
        else:
            assert batch == 1 and 0 <= cache.length < longest, "a reused cache must leave a token to prefill"
            stats.reused_tokens = cache.length
            input_ids = np.array([prompts[0][cache.length:]], dtype=np.int64)
            mask = np.ones((1, longest), dtype=np.int64)
        t = time.perf_counter()
        logits = self._step(self.prefill, input_ids, mask, cache)
        stats.prefill_seconds = time.perf_counter() - t
        alive = [True] * batch
        t = time.perf_counter()
        for step in range(max_new_tokens):
            next_ids = np.full((batch, 1), self.pad_id, dtype=np.int64)
            for r in range(batch):
                if not alive[r]:
                    continue
                token = samplers[r](logits[r], seen[r])
                next_ids[r, 0] = token
                if _collect is not None:
                    _collect[r].token_ids.append(token)
                if token in self.eos_ids:
                    alive[r] = False
                    self._finish(_collect, r, "stop")
                    piece = streams[r].flush()
                else:
                    seen[r] = np.append(seen[r], token)
                    piece = streams[r].push(token)
                    if streams[r].stopped:
                        alive[r] = False
                        self._finish(_collect, r, "stop")
                if piece:
                    yield r, piece
            stats.generated_tokens = step + 1
            if not any(alive) or step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            logits = self._step(self.decode, next_ids, mask, cache)
            stats.decode_seconds = time.perf_counter() - t
        if _collect is not None:
            for c in _collect:
                c.stats = stats
        for r in range(batch):
            if alive[r]:
                piece = streams[r].flush()
                if piece:
                    yield r, piece

    @staticmethod
    def _finish(collect, row, reason):
        if collect is not None:
            collect[row].finish_reason = reason

    def _step(self, session: ort.InferenceSession, input_ids: np.ndarray, mask: np.ndarray,
              cache: KVCache) -> np.ndarray:
        """Run one graph call; the cache takes the presents, the last position's logits [B, V] return."""
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_output("logits")
        cache.bind(binding)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # in bind order: logits, then the presents
        cache.update(outputs[1:])
        return outputs[0].numpy()

    def sampling_params(self, temperature=None, top_k=None, top_p=None, repetition_penalty=None,
                        seed=None) -> SamplingParams:
        """Explicit values, else the model's generation defaults, else greedy."""
        d = self.defaults
        if temperature is None:
            temperature = d.get("temperature", 0.0) if d.get("do_sample") else 0.0
        return SamplingParams(
            temperature=temperature,
            top_k=d.get("top_k", 0) if top_k is None else top_k,
            top_p=d.get("top_p", 1.0) if top_p is None else top_p,
            repetition_penalty=d.get("repetition_penalty", 1.0) if repetition_penalty is None else repetition_penalty,
            seed=seed).check()


def is_batch(prompt) -> bool:
    """A batch is a list of prompts (str) or of chats (lists); a list of dicts is one chat."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)


def is_token_ids(prompt) -> bool:
    """A prompt given as token ids: a non-empty list of ints."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, (int, np.integer)) for t in prompt)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask [B, longest], prompts aligned to the right."""
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), longest), dtype=np.int64)
    for r, p in enumerate(prompts):
        ids[r, longest - len(p):] = p
        mask[r, longest - len(p):] = 1
    return ids, mask


def resolve_provider(provider: str) -> str:
    name = PROVIDERS.get(provider)
    if name is None:
        raise ArgumentError(f"provider {provider!r}: expected one of {', '.join(PROVIDERS)}")
    if name not in ort.get_available_providers():
        raise ArgumentError(f"provider {provider!r}: this onnxruntime build has only "
                            f"{', '.join(ort.get_available_providers())}")
    return name


def session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ArgumentError(f"threads {threads}: expected an integer >= 1")
        options.intra_op_num_threads = threads
    return options


def load(path, provider: str = "cpu", threads: int | None = None, max_length: int | None = None,
         verify: bool = False, preload: bool = True) -> Model:
    """Load an exported model folder.

    provider: "cpu", "cuda" or "dml"; threads: CPU threads (default: onnxruntime's choice); max_length:
    the context budget, prompt plus new tokens (default: the model's context length); verify: also check
    every file's sha256 (slower); preload: create the prefill and decode sessions now rather than on
    first use (evaluation, which uses the score graph, passes False)."""
    return Model(Path(path), provider=provider, threads=threads, max_length=max_length, verify=verify,
                 preload=preload)
