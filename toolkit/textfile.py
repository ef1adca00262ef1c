"""Reading a text file the user named (eval --text, export --calibration) with the one-line error."""
from pathlib import Path

from toolkit.errors import ArgumentError


def read_text_file(path, option: str) -> str:
    """The UTF-8 text of `path`, or ArgumentError naming `option` and the file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ArgumentError(f"{option} {path}: expected a readable UTF-8 text file ({e.__class__.__name__})") from None
