"""Multi-turn chat with KV reuse (ChatSession), the chat API, and calls from several threads."""
import threading

import pytest

import toolkit
from toolkit.errors import ArgumentError, ContextOverflowError

GREEDY = dict(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def model(exported):
    return toolkit.load(exported("tied_fp32", bits=32), max_length=512)


def test_turns_reuse_the_cache_and_answer_as_a_full_prefill_would(model):
    chat = model.chat_session(system="Be brief.", **GREEDY)
    first = chat.send("hello there")
    assert chat.last.reused_tokens == 0 and chat.last.prompt_tokens > 0
    before = chat.history
    second = chat.send("and again, please")
    # the second turn prefilled only what the first did not already hold
    assert chat.last.reused_tokens > chat.last.prompt_tokens // 2
    assert chat.context_used >= chat.last.prompt_tokens
    assert second == model.generate(before + [{"role": "user", "content": "and again, please"}], **GREEDY)
    assert [m["role"] for m in chat.history] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.history[2]["content"] == first


def test_changing_the_system_prompt_re_prefills_from_the_change(model):
    chat = model.chat_session(**GREEDY)
    chat.send("hello there")
    chat.set_system("A new system prompt.")
    answer = chat.send("once more")
    assert answer == model.generate(chat.history[:-1], **GREEDY)
    chat.reset()
    assert chat.history == [{"role": "system", "content": "A new system prompt."}] and chat.context_used == 0


def test_a_stopped_stream_keeps_the_partial_answer_and_the_next_turn_works(model):
    chat = model.chat_session(temperature=0, max_new_tokens=40)
    stream = chat.send("tell me a long story", stream=True)
    got = next(stream)
    stream.close()
    assert chat.history[-1] == {"role": "assistant", "content": got}
    assert chat.send("go on") == model.generate(chat.history[:-1], temperature=0, max_new_tokens=40)


def test_overflow_drops_the_oldest_turns_and_keeps_the_system_prompt(exported):
    small = toolkit.load(exported("tied_fp32", bits=32), max_length=96)
    chat = small.chat_session(system="S", temperature=0, max_new_tokens=16)
    for i in range(6):
        chat.send(f"message number {i} with a few more words in it")
    assert chat.dropped_turns > 0
    assert chat.history[0] == {"role": "system", "content": "S"}
    assert chat.history[-2]["content"] == "message number 5 with a few more words in it"
    with pytest.raises(ContextOverflowError, match="do not fit max_length 96"):
        chat.send("word " * 200)


def test_one_turn_at_a_time_per_session(model):
    chat = model.chat_session(**GREEDY)
    stream = chat.send("hello", stream=True)
    next(stream)
    with pytest.raises(ArgumentError, match="already in progress"):
        chat.send("interrupting")
    stream.close()
    chat.send("now it is my turn")


def test_chat_api_and_bad_messages(model):
    messages = [{"role": "user", "content": "hi"}]
    assert "".join(model.chat(messages, stream=True, **GREEDY)) == model.chat(messages, **GREEDY)
    with pytest.raises(ArgumentError, match="messages: expected a list"):
        model.chat("hi")
    with pytest.raises(ArgumentError, match="message: expected a non-empty string"):
        model.chat_session().send("")


def test_threads_share_one_model(model):
    prompts = [f"question {i}" for i in range(4)]
    expected = [model.generate(p, **GREEDY) for p in prompts]
    got = [None] * len(prompts)

    def worker(i):
        got[i] = model.generate(prompts[i], **GREEDY)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_prompt_lookup_gives_exactly_the_greedy_tokens(exported):
    from toolkit.generation import prompt_lookup

    assert prompt_lookup([1, 2, 3, 4, 9, 2, 3], 3) == [4, 9, 2]  # the last 2-gram "2 3" was followed by 4 9 2
    assert prompt_lookup([5, 6, 7], 4) == [] and prompt_lookup([7, 7], 4) == [7]
    for bits in (32, 4):
        model = toolkit.load(exported("tied_fp32", bits=bits), max_length=512)
        text = "def add(a, b):\n    return a + b\n\n" * 3
        prompt = [{"role": "user", "content": f"Repeat this code:\n{text}"}]
        plain = model.complete([prompt], temperature=0, max_new_tokens=60)[0]
        for k in (1, 4, 10):
            fast = model.complete([prompt], temperature=0, max_new_tokens=60, lookup=k)[0]  # penalty 1.05 too
            assert fast.token_ids == plain.token_ids and fast.text == plain.text
            assert fast.finish_reason == plain.finish_reason
        # and in a chat session, whose cache must stay exactly what it saw
        chat = model.chat_session(temperature=0, max_new_tokens=30, lookup=6)
        ref = model.chat_session(temperature=0, max_new_tokens=30)
        for turn in ("hello hello hello", "again hello hello"):
            assert chat.send(turn) == ref.send(turn)
    with pytest.raises(ArgumentError, match="lookup: needs one prompt and greedy"):
        model.generate("hi", temperature=0.7, lookup=4)
    with pytest.raises(ArgumentError, match="lookup -1"):
        model.generate("hi", temperature=0, lookup=-1)
