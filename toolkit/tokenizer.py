"""Tokenizer (Hugging Face `tokenizers`, from tokenizer.json) and incremental detokenization.

`TextStream` turns a growing list of token ids into text pieces that never split a UTF-8 character and
never run past a stop string, holding back only what might still change.
"""
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

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
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


class TextStream:
    """Decode generated ids incrementally; `push(id)` returns the text that became final."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (final or not)
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False  # a stop string was found; self.text is cut before it

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith(REPLACEMENT):  # a multi-byte character is not complete yet
            return ""
        self.text = text
        cut = self._stop_at()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._emit(len(self.text))
        return self._emit(len(self.text) - self._held_back())

    def flush(self) -> str:
        """The rest of the text at the end of generation."""
        return self._emit(len(self.text))

    def _stop_at(self) -> int | None:
        window = max((len(s) for s in self.stop), default=0)
        start = max(0, self.emitted - window)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        piece, self.emitted = self.text[self.emitted:upto], upto
        return piece
