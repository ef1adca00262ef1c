"""Tokenizer (Hugging Face `tokenizers`, from tokenizer.json) and incremental detokenization.

`TextStream` turns a growing list of token ids into text pieces that never split a UTF-8 character and
never run past a stop string, holding back only what might still change. It decodes incrementally with
`tokenizers.decoders.DecodeStream` (a few tokens per step, whatever the length of the answer).

Special tokens: `encode` maps special-token text (<|im_start|> …) to the control tokens, as transformers and
llama.cpp do with a rendered chat; `encode_pieces` keeps it plain text in the pieces marked literal (user
and tool content, `literal_content=True` in the Model API).
"""
import re
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream

from toolkit.errors import ModelFolderError

REPLACEMENT = "\ufffd"  # what a byte-level BPE decodes an incomplete UTF-8 sequence to


class Tokenizer:
    """Text <-> token ids. Special tokens written in the text (<|im_start|> …) map to their ids."""

    def __init__(self, path: Path):
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ModelFolderError(f"{path}: not a readable tokenizer.json ({e})") from None

    def encode(self, text: str) -> list[int]:
        # encode_batch gives the same ids and lets other Python threads run meanwhile (encode holds the GIL:
        # a 1 MiB prompt stalled the server's event loop for 0.75 s)
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_pieces(self, pieces: list[tuple[str, bool]]) -> list[int]:
        """Token ids of a text given as (text, literal) pieces: special-token text in a piece that is not
        literal maps to its control token, as in `encode`; in a literal piece it is plain text. The text
        between special tokens is encoded as one run, so where literal pieces hold no special-token text the
        ids are those of `encode` on the joined text."""
        ids, run = [], ""
        for text, literal in pieces:
            parts = [text] if literal or self._specials is None else self._specials.split(text)
            for k, part in enumerate(parts):
                if k % 2:  # a special token written by the template
                    ids += self._plain(run) + [self._tok.token_to_id(part)]
                    run = ""
                else:
                    run += part
        return ids + self._plain(run)

    @cached_property
    def _specials(self) -> re.Pattern | None:
        """Matches the special tokens' text (longest first), as a capturing group for re.split."""
        names = sorted((t.content for t in self._tok.get_added_tokens_decoder().values() if t.special),
                       key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    @cached_property
    def _literal(self) -> _HFTokenizer:
        """A copy of the tokenizer that encodes special-token text as ordinary text (loaded on first use)."""
        tok = _HFTokenizer.from_str(self._tok.to_str())
        tok.encode_special_tokens = True
        return tok

    def _plain(self, text: str) -> list[int]:
        return self._literal.encode_batch([text], add_special_tokens=False)[0].ids if text else []

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def decode_stream(self) -> "StreamDecoder":
        """An incremental decoder (see TextStream)."""
        return StreamDecoder(self._tok)

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what llguidance builds its own from: toolkit/constrained.py)."""
        return self._tok.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


class StreamDecoder:
    """`step(id)`: the text that id completes, or None while a character is still incomplete (DecodeStream,
    skipping special tokens as `Tokenizer.decode` does)."""

    def __init__(self, tok: _HFTokenizer):
        self._tok, self._stream = tok, DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._tok, token_id)
        except Exception:  # DecodeStream refuses an id it cannot decode or a prefix that decodes differently
            self._stream = DecodeStream(skip_special_tokens=True)  # start afresh from this token
            return self._stream.step(self._tok, token_id)


class RedecodeDecoder:
    """`step(id)` for a tokenizer with only `decode(ids)`: the same prefix/read-offset scheme as DecodeStream,
    re-decoding a few tokens per step (the ids since the last complete character, plus those before them)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.prefix, self.start = tokenizer, [], "", 0

    def step(self, token_id: int) -> str | None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if len(text) <= len(self.prefix) or text.endswith(REPLACEMENT):
            return None
        new = text[len(self.prefix):]
        self.ids = self.ids[self.start:]
        self.prefix, self.start = self.tokenizer.decode(self.ids), len(self.ids)
        return new


class TextStream:
    """Decode generated ids incrementally; `push(id)` returns the text that became final."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.stop = tuple(s for s in stop if s)
        stream = getattr(tokenizer, "decode_stream", None)
        self._decoder = stream() if stream is not None else RedecodeDecoder(tokenizer)
        self.window = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # the text decoded so far (final or not), less what was emitted before the last `window` chars
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False  # a stop string was found; self.text is cut before it

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        new = self._decoder.step(token_id)
        if not new:  # a multi-byte character is not complete yet, or a special token (skipped)
            return ""
        self.text += new
        cut = self._stop_at(len(new))
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._emit(len(self.text))
        return self._emit(len(self.text) - self._held_back())

    def flush(self) -> str:
        """The rest of the text at the end of generation."""
        return self._emit(len(self.text))

    def _stop_at(self, new: int) -> int | None:
        """Where the first stop string starts, looking only where the `new` characters can complete one."""
        start = max(0, len(self.text) - new - self.window + 1, self.emitted - self.window)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best, text = 0, self.text
        if not text:
            return 0
        for s in self.stop:
            n = min(len(s) - 1, len(text))
            while n > best:  # only lengths whose prefix ends with the text's last character can match
                n = s.rfind(text[-1], 0, n) + 1
                if n > best and text.endswith(s[:n]):
                    best = n
                    break
                n -= 1
        return best

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        piece, self.emitted = self.text[self.emitted:upto], upto
        done = self.emitted - self.window  # emitted text no stop string can still reach
        if done > 4096:  # drop it now and then, so that a step's work does not grow with the answer
            self.text, self.emitted = self.text[done:], self.emitted - done
        return piece
