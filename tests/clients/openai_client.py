"""Drives modelpool's OpenAI-compatible API with the official `openai` package.

Usage: openai_client.py BASE_URL SCENARIO [ARGS...]
BASE_URL is like http://127.0.0.1:8080/v1. Every scenario asserts and exits non-zero
on the first failure; the end-to-end tests in tests/tests/e2e/openai.rs run them.
"""

import sys

import openai

SYSTEM = "You are a helpful assistant."
QUESTION = "What is the capital of France?"


def client(base_url, key="unused"):
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


def ask(model):
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": QUESTION},
    ]


def check_models(c, model):
    listed = {m.id: m for m in c.models.list().data}
    assert model in listed, listed
    for m in listed.values():
        assert m.object == "model", m
        assert m.state in ("resident", "loading", "cold", "unloading"), m
    one = c.models.retrieve(model)
    assert one.id == model and one.state in ("resident", "cold"), one


def check_chat(c, model):
    r = c.chat.completions.create(model=model, messages=ask(model), max_tokens=16, temperature=0)
    text = r.choices[0].message.content
    assert "Paris" in text, text
    assert r.choices[0].message.role == "assistant", r
    assert r.choices[0].finish_reason in ("stop", "length"), r
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 16, r.usage
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage
    assert r.model == model and r.object == "chat.completion", r


def check_streamed_chat(c, model):
    stream = c.chat.completions.create(
        model=model,
        messages=ask(model),
        max_completion_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == [], chunk
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            deltas.append(choice.delta.content)
        if choice.finish_reason is not None:
            finish = choice.finish_reason
    text = "".join(deltas)
    assert "Paris" in text, text
    assert len(deltas) > 1, deltas
    assert finish in ("stop", "length"), finish
    assert usage is not None and usage.completion_tokens > 0, usage


def check_completion(c, model):
    r = c.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=4, temperature=0)
    assert r.object == "text_completion", r
    assert r.choices[0].text.strip(), r
    assert r.choices[0].finish_reason == "length", r
    assert r.usage.completion_tokens == 4, r.usage
    pieces = [
        ch.choices[0].text
        for ch in c.completions.create(
            model=model, prompt="1, 2, 3, 4,", max_tokens=4, temperature=0, stream=True
        )
        if ch.choices
    ]
    assert "".join(pieces) == r.choices[0].text, (pieces, r.choices[0].text)


def check_errors(c, model):
    try:
        c.chat.completions.create(model=model, messages=ask(model), temperature=5)
        raise AssertionError("temperature 5 was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400, e
        assert e.body["param"] == "temperature", e.body
        assert "temperature" in e.body["message"], e.body
    try:
        c.chat.completions.create(model=model, messages=ask(model), n=2)
        raise AssertionError("n=2 was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "n", e.body
    try:
        c.chat.completions.create(model="no-such-model", messages=ask(model))
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404, e
        assert model in e.body["message"], e.body
    try:
        c.models.retrieve("no-such-model")
        raise AssertionError("an unknown model was listed")
    except openai.NotFoundError as e:
        assert model in e.body["message"], e.body


def basic(base_url, model):
    c = client(base_url)
    check_models(c, model)
    check_chat(c, model)
    check_streamed_chat(c, model)
    check_completion(c, model)
    check_errors(c, model)


def cold(base_url, model):
    """A streamed chat to a model that is not resident: it loads during the request."""
    c = client(base_url)
    assert c.models.retrieve(model).state == "cold"
    check_streamed_chat(c, model)
    assert c.models.retrieve(model).state == "resident"


def disconnect(base_url, model):
    """Reads a few deltas of a long generation, says so, waits for a line on stdin,
    then closes the connection."""
    c = client(base_url)
    stream = c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count from 1 to 1000, one number per line."}],
        max_tokens=2000,
        temperature=0,
        stream=True,
    )
    seen = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen += 1
        if seen >= 3:
            break
    print("streaming", flush=True)
    sys.stdin.readline()
    stream.close()
    print("closed", flush=True)


def auth(base_url, model, good, bad):
    try:
        client(base_url, bad).models.list()
        raise AssertionError("a wrong token was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401, e
    check_chat(client(base_url, good), model)


SCENARIOS = {"basic": basic, "cold": cold, "disconnect": disconnect, "auth": auth}

if __name__ == "__main__":
    SCENARIOS[sys.argv[2]](sys.argv[1], *sys.argv[3:])
    print("ok", flush=True)
