"""Drives modelpool's KServe v2 / Triton gRPC API with the `tritonclient[grpc]` package.

Usage: triton_client.py HOST:PORT SCENARIO MODEL
Every scenario asserts and exits non-zero on the first failure; the end-to-end tests
in tests/tests/e2e/kserve.rs run them.
"""

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

# SmolLM2's chat template, written out: text_input is a raw prompt.
PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def inputs(prompt, sampling, stream=None):
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    params = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=np.object_))
    out = [text, params]
    if stream is not None:
        flag = grpcclient.InferInput("stream", [1], "BOOL")
        flag.set_data_from_numpy(np.array([stream], dtype=bool))
        out.append(flag)
    return out


def index(c):
    return {m["name"]: m for m in c.get_model_repository_index(as_json=True).get("models", [])}


def repository(c, model):
    assert c.is_server_live()
    assert c.is_server_ready()
    meta = c.get_server_metadata(as_json=True)
    assert "model_repository" in meta["extensions"], meta
    assert index(c)[model]["state"] == "UNAVAILABLE", index(c)
    assert not c.is_model_ready(model)
    c.load_model(model)
    assert c.is_model_ready(model)
    assert index(c)[model]["state"] == "READY", index(c)
    m = c.get_model_metadata(model, as_json=True)
    assert [i["name"] for i in m["inputs"]] == ["text_input", "sampling_parameters", "stream"], m
    assert m["outputs"][0]["name"] == "text_output", m
    c.unload_model(model)
    assert not c.is_model_ready(model)
    assert index(c)[model]["state"] == "UNAVAILABLE", index(c)
    try:
        c.load_model("no-such-model")
        raise AssertionError("an unknown model loaded")
    except InferenceServerException as e:
        assert model in e.message(), e.message()


def infer(c, model):
    r = c.infer(model, inputs(PROMPT, {"max_tokens": 12, "temperature": 0}))
    text = r.as_numpy("text_output")[0].decode()
    assert "Paris" in text, text
    params = r.get_response().parameters
    assert params["finish_reason"].string_param in ("stop", "length"), params
    assert 0 < params["completion_tokens"].int64_param <= 12, params
    try:
        c.infer(model, inputs(PROMPT, {"temperature": 9}))
        raise AssertionError("temperature 9 was accepted")
    except InferenceServerException as e:
        assert "temperature" in e.message(), e.message()
    try:
        c.infer("no-such-model", inputs(PROMPT, {}))
        raise AssertionError("an unknown model was accepted")
    except InferenceServerException as e:
        assert model in e.message(), e.message()


def stream(c, model):
    results = queue.Queue()
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    c.async_stream_infer(
        model,
        inputs(PROMPT, {"max_tokens": 12, "temperature": 0}, stream=True),
        request_id="q1",
        enable_empty_final_response=True,
    )
    deltas = []
    while True:
        result, error = results.get(timeout=120)
        assert error is None, error
        response = result.get_response()
        assert response.id == "q1", response
        final = response.parameters["triton_final_response"].bool_param
        if final:
            assert result.as_numpy("text_output") is None, response
            assert response.parameters["finish_reason"].string_param in ("stop", "length")
            break
        deltas.append(result.as_numpy("text_output")[0].decode())
    c.stop_stream()
    text = "".join(deltas)
    assert len(deltas) > 1, deltas
    assert "Paris" in text, text


SCENARIOS = {"repository": repository, "infer": infer, "stream": stream}

if __name__ == "__main__":
    address, scenario, model = sys.argv[1:4]
    SCENARIOS[scenario](grpcclient.InferenceServerClient(url=address), model)
    print("ok", flush=True)
