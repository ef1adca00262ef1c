"""Every bad input to the Python API raises a QwenEdgeError subclass whose one-line message names it."""
import pytest

import toolkit
from toolkit.errors import ArgumentError, ModelFolderError, QwenEdgeError


@pytest.fixture(scope="module")
def model(exported):
    return toolkit.load(exported("tied_fp32", bits=32), max_length=256)


@pytest.mark.parametrize("kwargs,error,needle", [
    (dict(provider="tpu"), ArgumentError, "provider 'tpu'"),
    (dict(threads=0), ArgumentError, "threads 0"),
    (dict(max_length=1), ArgumentError, "max_length 1"),
    (dict(max_length="long"), ArgumentError, "max_length long"),
])
def test_bad_load_options(exported, kwargs, error, needle):
    with pytest.raises(error, match=needle) as e:
        toolkit.load(exported("tied_fp32", bits=32), **kwargs)
    assert "\n" not in str(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="nowhere: expected a model folder"):
        toolkit.load(tmp_path / "nowhere")


@pytest.mark.parametrize("call,needle", [
    (lambda m: m.generate("hi", max_new_tokens=0), "max_new_tokens 0"),
    (lambda m: m.generate("hi", max_new_tokens=True), "max_new_tokens True"),
    (lambda m: m.generate("hi", stop=[1]), "stop"),
    (lambda m: m.generate("hi", temperature=-1), "temperature -1"),
    (lambda m: m.generate("hi", seed=-1), "seed -1"),
    (lambda m: m.generate(""), "prompt: expected at least one token"),
    (lambda m: list(m.stream(["a", "b"])), "stream: expected one prompt"),
    (lambda m: m.complete([]), "prompts: expected a non-empty list"),
    (lambda m: m.chat("hi"), "messages: expected a list"),
    (lambda m: m.chat_session().send(None), "message: expected a non-empty string"),
    (lambda m: m.session("nothing"), "has no 'nothing' graph"),
])
def test_bad_call_arguments(model, call, needle):
    with pytest.raises(QwenEdgeError, match=needle) as e:
        call(model)
    assert "\n" not in str(e.value)


def test_argument_errors_are_value_errors_too(model):
    with pytest.raises(ValueError):
        model.generate("hi", top_p=2)
