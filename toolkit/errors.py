"""The exceptions qwen-edge raises. Each message is one line that names the file or argument and what was
expected; the CLI prints it as `error: <message>` and exits with status 2."""


class QwenEdgeError(Exception):
    """Base class of every error qwen-edge raises on bad input."""


class ModelFolderError(QwenEdgeError):
    """A checkpoint or exported model folder is missing, malformed or unsupported."""


class ArgumentError(QwenEdgeError, ValueError):
    """An argument (CLI option or API parameter) has a value outside what is accepted."""


class ContextOverflowError(QwenEdgeError):
    """A prompt (plus the tokens asked for) does not fit the model's context."""
