"""The terminal chat behind `qwen-edge chat`: streaming answers, multi-turn history, /reset and /exit.

Ctrl-C while an answer streams stops that answer (the partial answer stays in the history); Ctrl-C or
Ctrl-D at the prompt leaves.
"""
import sys
import time

import click

HELP = "commands: /reset (forget the conversation), /exit (quit)"


def run_chat(model, system=None, **options) -> None:
    """Read a line, stream the answer, repeat; the whole history is re-sent each turn."""
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    click.echo(f"qwen-edge chat — {HELP}", err=True)
    while True:
        try:
            line = input(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            click.echo("", err=True)
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = list(base)
            click.echo("(conversation cleared)", err=True)
            continue
        if line.startswith("/"):
            click.echo(f"unknown command {line.split()[0]}; {HELP}", err=True)
            continue
        history.append({"role": "user", "content": line})
        history.append({"role": "assistant", "content": answer(model, history, options)})


def answer(model, history, options) -> str:
    text, count, started = "", 0, time.time()
    try:
        for piece in model.stream(history, **options):
            text += piece
            count += 1
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        click.echo(" [stopped]", err=True)
    sys.stdout.write("\n")
    elapsed = time.time() - started
    click.echo(f"({count} pieces in {elapsed:.1f} s)", err=True)
    return text
