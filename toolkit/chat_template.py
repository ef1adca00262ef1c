"""Render a checkpoint's chat template (Jinja) the way transformers does, inside jinja2's sandbox."""
import json
from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from toolkit.errors import ArgumentError, ModelFolderError


def _raise(message):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A compiled chat template; `render(messages)` gives the prompt text for the model."""

    def __init__(self, source: str, special_tokens: dict):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ModelFolderError(f"chat template: does not compile ({e})") from None
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}

    def render(self, messages: list, add_generation_prompt: bool = True, tools=None) -> str:
        check_messages(messages)
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        tools=tools, **self.special_tokens)
        except TemplateError as e:  # includes the sandbox's SecurityError
            raise ArgumentError(f"chat template: {type(e).__name__}: {e}") from None


def check_messages(messages) -> None:
    """Messages are a non-empty list of {"role": str, "content": str} objects."""
    if not isinstance(messages, list) or not messages:
        raise ArgumentError("messages: expected a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ArgumentError(f"messages[{i}]: expected {{'role': str, 'content': str}}, got {m!r:.80}")
