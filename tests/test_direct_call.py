"""Compile once, dispatch without Dynamo: engines call their graph runner directly after warm-up,
and many engines in one process each compile (Dynamo's recompile limit is per code object)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helpers import make_llm, mixed_prompts, reference_greedy, sharp_model, write_hf_model
from fullgraph_backend.backend import RecordingBackend
from fullgraph_backend.direct_call import CannotBind, DirectCall
from fullgraph_backend.engine import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
CAPTURE = {"compiler": "eager", "capture_sizes": (2, 4, 8, 32)}


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory):
    return write_hf_model(tmp_path_factory.mktemp("sharp"), sharp_model())


def test_steps_skip_dynamo_after_warm_up(sharp_dir, monkeypatch):
    llm = make_llm(sharp_dir, 4, compile_options=CAPTURE)
    assert isinstance(llm.runner.model.func, DirectCall)
    calls = []
    runner = llm.runner.graph_runners[0]
    monkeypatch.setattr(type(runner), "__call__", lambda self, *a, _c=type(runner).__call__: (calls.append(1), _c(self, *a))[1])
    frames = []
    monkeypatch.setattr(torch._dynamo.eval_frame, "_maybe_set_eval_frame",
                        lambda *a, _f=torch._dynamo.eval_frame._maybe_set_eval_frame: (frames.append(1), _f(*a))[1])
    prompts = mixed_prompts(3, seed=1)
    got = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert calls and not frames, "a step went through Dynamo"
    reference = sharp_model()
    assert got == [reference_greedy(reference, p, GREEDY.max_tokens) for p in prompts]


def test_many_engines_in_one_process_all_compile(sharp_dir):
    """Dynamo's default recompile limit is 8: the 9th engine on one code object ran uncompiled."""
    prompts = mixed_prompts(2, seed=2)
    first = None
    for i in range(10):
        llm = make_llm(sharp_dir, 4, compile_options=CAPTURE)
        assert llm.startup.num_graphs > 0, f"engine {i} was not compiled"
        tokens = [o.token_ids for o in llm.generate(prompts, GREEDY)]
        first = first or tokens
        assert tokens == first
        del llm


def test_a_graph_reading_into_a_call_argument_cannot_bind():
    def step(model, batch):
        return model(batch["x"])

    backend = RecordingBackend({"compiler": "eager", "capture_sizes": [2, 4]})
    model = nn.Linear(4, 4).eval().requires_grad_(False)
    with torch.inference_mode():
        x = torch.randn(3, 4)
        torch._dynamo.mark_dynamic(x, 0)
        torch.compile(step, backend=backend)(model, {"x": x})
    with pytest.raises(CannotBind, match="batch"):
        DirectCall(backend.runners[0], ("model", "batch"), fixed=("model",))


def test_direct_call_equals_the_compiled_function():
    def step(model, x):
        return model(x) * 2

    backend = RecordingBackend({"compiler": "eager", "capture_sizes": [2, 4, 8]})
    model = nn.Linear(4, 4).eval().requires_grad_(False)
    compiled = torch.compile(step, backend=backend)
    with torch.inference_mode():
        x = torch.randn(3, 4)
        torch._dynamo.mark_dynamic(x, 0)
        compiled(model, x)
        direct = DirectCall(backend.runners[0], ("model", "x"), fixed=("model",))
        for n in (5, 2, 8, 3):
            x = torch.randn(n, 4)
            torch.testing.assert_close(direct(model, x), step(model, x))
