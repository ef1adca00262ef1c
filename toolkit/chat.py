"""The terminal chat behind `qwen-edge chat`: streaming answers, multi-turn memory through a ChatSession
(the KV cache is kept between turns, only new tokens are prefilled), line editing and history (readline).

Input: a line ending in a backslash continues on the next line; a line of three double quotes starts a
block that ends at the next such line. Commands: /reset, /system TEXT, /stats, /help, /exit. Ctrl-C while
an answer streams stops that answer (the partial answer stays in the history); Ctrl-C or Ctrl-D at the
prompt leaves. After each answer a status line shows prefill and decode speed and the context used.
"""
import signal
import sys

import click

from toolkit.errors import QwenEdgeError

HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system prompt), /stats, /help, /exit; "
        'end a line with \\ to continue it, or wrap a block in """')
PROMPT, MORE = ">>> ", "... "


def run_chat(model, system=None, **options) -> None:
    """Read a message, stream the answer, repeat until /exit or end of input."""
    enable_line_editing()
    # Ctrl-C is how a person stops an answer: raise KeyboardInterrupt even if this process was started with
    # SIGINT ignored (as a shell does for a background job; children inherit it).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    chat = model.chat_session(system=system, **options)
    totals = {"turns": 0, "generated": 0, "drafted": 0, "accepted": 0}
    click.echo(f"qwen-edge chat — {HELP}", err=True)
    while True:
        try:
            text = read_message()
        except (EOFError, KeyboardInterrupt):
            click.echo("", err=True)
            return
        if not text.strip():
            continue
        command, _, arg = text.strip().partition(" ")
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            chat.reset()
            click.echo("(conversation cleared)", err=True)
        elif command == "/system":
            if arg.strip():
                chat.set_system(arg.strip())
                click.echo("(system prompt set; the turns so far are kept)", err=True)
            else:
                click.echo(f"(system prompt: {chat.system!r})", err=True)
        elif command == "/stats":
            click.echo(stats_text(chat, totals), err=True)
        elif command == "/help":
            click.echo(HELP, err=True)
        elif command.startswith("/") and len(command) > 1:
            click.echo(f"unknown command {command}; {HELP}", err=True)
        else:
            answer(chat, text, totals)


def enable_line_editing() -> None:
    """Importing readline gives input() line editing and history, where the platform has it."""
    import importlib

    try:
        importlib.import_module("readline")
    except ImportError:
        pass


def read_message() -> str:
    """One message from the terminal: a line, continued lines (trailing backslash) or a \"\"\" block."""
    line = input(PROMPT)
    if line.strip() == '"""':
        lines = []
        while (line := input(MORE)).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = input(MORE)
    return "\n".join(lines + [line])


def answer(chat, text: str, totals: dict) -> None:
    try:
        for piece in chat.send(text, stream=True):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        click.echo(" [stopped]", err=True)
    except QwenEdgeError as e:  # e.g. a message that alone does not fit the context: say so, keep chatting
        click.echo(f"error: {e}", err=True)
        return
    sys.stdout.write("\n")
    totals["turns"] += 1
    if chat.last:
        totals["generated"] += chat.last.generated_tokens
        totals["drafted"] += chat.last.drafted_tokens
        totals["accepted"] += chat.last.accepted_tokens
        click.echo(click.style(status_line(chat), dim=True), err=True)


def status_line(chat) -> str:
    s = chat.last
    new = s.prompt_tokens - s.reused_tokens
    return (f"[prefill {new} tok ({s.reused_tokens} reused) in {s.prefill_seconds:.2f} s, "
            f"{s.prefill_tokens_per_second:,.0f} tok/s · decode {s.generated_tokens} tok, "
            f"{s.decode_tokens_per_second:.1f} tok/s{draft_part(s.drafted_tokens, s.accepted_tokens)} · "
            f"context {chat.context_used}/{chat.model.max_length}]")


def draft_part(drafted: int, accepted: int) -> str:
    """' · draft 41/60 accepted (68 %)' when tokens were drafted (a draft model or prompt lookup), else ''."""
    return f" · draft {accepted}/{drafted} accepted ({100 * accepted / drafted:.0f} %)" if drafted else ""


def stats_text(chat, totals: dict) -> str:
    lines = [f"turns {totals['turns']}, tokens generated {totals['generated']}, "
             f"context {chat.context_used}/{chat.model.max_length} tokens, "
             f"turns dropped to fit {chat.dropped_turns}"]
    if totals.get("drafted"):
        lines.append(f"drafted tokens {totals['drafted']}, accepted {totals['accepted']} "
                     f"({100 * totals['accepted'] / totals['drafted']:.1f} %)")
    if chat.last:
        lines.append("last answer: " + status_line(chat))
    return "\n".join(lines)
