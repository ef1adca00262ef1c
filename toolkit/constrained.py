"""Constrained decoding: a Lark grammar or a JSON schema that the output must follow, enforced by masking the
logits of every token that would leave the grammar before sampling (llguidance, the library onnxruntime-genai
and llama.cpp use; an optional dependency: pip install 'qwen-edge[constrained]').

    model.generate("List three primes as JSON.", json_schema={"type": "array", "items": {"type": "integer"}})
    model.generate("Yes or no?", grammar='start: "yes" | "no"')

`compile_constraint` checks the grammar against the model's tokenizer (an ArgumentError naming the option when
it does not compile, or when llguidance is missing); each generated row then gets a `Matcher`, which computes
the row's token mask (a bitmask llguidance writes into a buffer allocated once per row) and sets the logits of
the tokens outside it to -inf, in place. Token ids past the tokenizer's vocabulary (Qwen pads the logits to
151936) are never allowed. When the grammar is complete and allows nothing more than an end token, the row
stops (finish_reason "stop") without another model call; when max_new_tokens runs out first, the output is
cut (finish_reason "length"), as OpenAI's.

JSON schemas are written on one line with ", " and ": " between items (the layout Python's json.dumps and
Qwen's chat template use); a schema's own "x-guidance" options (llguidance's JsonCompileOptions) override that.
"""
import json
import threading
import weakref
from dataclasses import dataclass

import numpy as np

from toolkit.errors import ArgumentError

INSTALL = "pip install 'qwen-edge[constrained]'"
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_tokenizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # Model -> llguidance.LLTokenizer
_lock = threading.Lock()


def llguidance(option: str):
    """The llguidance module, or an ArgumentError naming `option` and how to install it."""
    try:
        import llguidance as llg
    except ImportError:
        raise ArgumentError(f"{option}: constrained output needs llguidance, which is not installed "
                            f"({INSTALL})") from None
    return llg


def guidance_tokenizer(model, llg):
    """llguidance's view of the model's tokenizer (built from tokenizer.json, no transformers), once per Model:
    the sample's 151,936 tokens take about 0.9 s. Its vocabulary is the logits' width; the end tokens are the
    model's."""
    with _lock:
        tok = _tokenizers.get(model)
        if tok is None:
            tok = llg.LLTokenizer(model.tokenizer.to_json(), n_vocab=model.vocab_size,
                                  eos_token=sorted(model.eos_ids))
            _tokenizers[model] = tok
        return tok


@dataclass(frozen=True)
class Constraint:
    """A grammar checked against a model's tokenizer; `matcher()` gives one row's Matcher."""

    grammar: str  # llguidance's grammar text
    tokenizer: object  # llguidance.LLTokenizer
    llg: object  # the llguidance module

    def matcher(self) -> "Matcher":
        return Matcher(self)


def compile_constraint(model, grammar=None, json_schema=None, option: str | None = None) -> Constraint | None:
    """The Constraint of a call's `grammar` (Lark text in llguidance's dialect) or `json_schema` (a dict or its
    JSON text), or None when neither is given. ArgumentError (naming `option`, default the argument's name) when
    both are given, when one does not compile, or when llguidance is missing."""
    if grammar is None and json_schema is None:
        return None
    if grammar is not None and json_schema is not None:
        raise ArgumentError("grammar and json_schema: give one or the other")
    option = option or ("grammar" if grammar is not None else "json_schema")
    if grammar is not None and (not isinstance(grammar, str) or not grammar.strip()):
        raise ArgumentError(f"{option}: expected a Lark grammar (a non-empty string)")
    if json_schema is not None:
        json_schema = schema_object(json_schema, option)
    llg = llguidance(option)
    tokenizer = guidance_tokenizer(model, llg)
    try:  # llguidance raises ValueError for what it cannot read; whatever it raises here is the grammar's fault
        text = (llg.LLMatcher.grammar_from_lark(grammar) if grammar is not None
                else llg.LLMatcher.grammar_from_json_schema(json_schema, defaults=JSON_STYLE))
        problem = llg.LLMatcher.validate_grammar(text, tokenizer)
    except Exception as e:
        raise ArgumentError(f"{option}: {one_line(str(e))}") from None
    if problem:
        raise ArgumentError(f"{option}: does not compile ({one_line(problem)})")
    return Constraint(text, tokenizer, llg)


def schema_object(schema, option: str) -> dict:
    """A JSON schema given as a dict or as its JSON text, as a dict."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except (ValueError, RecursionError) as e:
            raise ArgumentError(f"{option}: not valid JSON ({one_line(str(e))})") from None
    if not isinstance(schema, dict):
        raise ArgumentError(f"{option}: expected a JSON schema object, got {type(schema).__name__}")
    return schema


def one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


BITS = np.arange(32, dtype=np.uint32)
SPARSE_WORDS = 256  # a mask with at most this many nonzero 32-token words is applied by its allowed ids


def apply_mask(words: np.ndarray, logits: np.ndarray) -> None:
    """Set logits [V] to -inf where the bitmask `words` (int32 [ceil(V / 32)], bit i of word k: token 32k + i)
    is 0. Measured on the sample's 151,936 logits, alone: few tokens allowed (JSON punctuation, keys): keep
    those, fill the rest (~25 µs); most allowed (inside a string): unpack the bits, one byte per token, and
    assign (~40-70 µs; numpy's unpackbits is ~4x faster than shifting into a preallocated buffer). Between
    model calls, with cold caches, ~190 µs (tests/bench/constrained.py)."""
    nonzero = np.flatnonzero(words)
    if nonzero.size <= SPARSE_WORDS:
        bits = (words[nonzero].view(np.uint32)[:, None] >> BITS) & 1
        ids = (nonzero[:, None] * 32 + BITS)[bits.astype(bool)]
        ids = ids[ids < logits.shape[-1]]
        kept = logits[ids]
        logits.fill(-np.inf)
        logits[ids] = kept
    else:
        allowed = np.unpackbits(words.view(np.uint8), count=logits.shape[-1], bitorder="little")
        logits[allowed == 0] = -np.inf


class Matcher:
    """One row's position in the grammar: `mask(logits)` before sampling, `consume(token)` after."""

    def __init__(self, constraint: Constraint):
        self._m = constraint.llg.LLMatcher(constraint.tokenizer, constraint.grammar)
        self.vocab = constraint.tokenizer.vocab_size
        self._words = np.zeros((self.vocab + 31) // 32, dtype=np.int32)  # llguidance writes the bitmask here
        self.check()

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """`logits` [V] with the tokens the grammar does not allow next set to -inf (in place when writable)."""
        self._m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        self.check()
        if not logits.flags.writeable:
            logits = logits.copy()
        apply_mask(self._words, logits)
        return logits

    def consume(self, token: int) -> None:
        self._m.consume_token(token)
        self.check()

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing but an end token."""
        return self._m.is_stopped()

    def check(self) -> None:
        if self._m.is_error():
            raise ArgumentError(f"grammar: the matcher failed ({one_line(self._m.get_error())})")
