"""FullgraphConfig: defaults, validation, options through torch.compile, entry-point registration."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from fullgraph_backend.config import FullgraphConfig, default_capture_sizes


def test_default_capture_sizes():
    sizes = default_capture_sizes()
    assert len(sizes) == 51
    assert sizes[:4] == (1, 2, 4, 8)
    assert sizes == (1, 2, 4, *range(8, 257, 8), *range(272, 513, 16))
    assert sizes[-1] == 512 and 256 in sizes and 264 not in sizes and 272 in sizes
    config = FullgraphConfig()
    assert config.capture_sizes == sizes
    assert (config.cudagraph_mode, config.attention_impl, config.max_num_seqs, config.compiler) == \
        ("full", "auto", None, "inductor")


def test_capture_sizes_are_sorted_and_deduplicated():
    assert FullgraphConfig(capture_sizes=[16, 4, 4, 1]).capture_sizes == (1, 4, 16)
    assert FullgraphConfig.from_options({"capture_sizes": (8, 2)}).capture_sizes == (2, 8)


@pytest.mark.parametrize("key, close", [("cudagraph_mod", "cudagraph_mode"), ("capture_size", "capture_sizes"),
                                        ("attention_imp", "attention_impl"), ("max_num_seq", "max_num_seqs")])
def test_unknown_option_names_the_close_one(key, close):
    with pytest.raises(ValueError, match=f"unknown fullgraph option '{key}'") as info:
        FullgraphConfig.from_options({key: 1})
    assert f"did you mean '{close}'" in str(info.value)


def test_unknown_option_without_close_match_lists_known():
    with pytest.raises(ValueError) as info:
        FullgraphConfig.from_options({"zzzz": 1})
    assert "did you mean" not in str(info.value)
    assert "cudagraph_mode" in str(info.value) and "capture_sizes" in str(info.value)


@pytest.mark.parametrize("options, match", [
    ({"cudagraph_mode": "partial"}, "cudagraph_mode must be one of"),
    ({"cudagraph_mode": "full_and_piecewise_typo"}, "cudagraph_mode"),
    ({"capture_sizes": 8}, "capture_sizes must be a sequence of positive ints"),
    ({"capture_sizes": [0, 8]}, "capture_sizes"),
    ({"capture_sizes": [-4]}, "capture_sizes"),
    ({"capture_sizes": [1.5]}, "capture_sizes"),
    ({"capture_sizes": [True, 4]}, "capture_sizes"),
    ({"capture_sizes": ["8"]}, "capture_sizes"),
    ({"attention_impl": "flash"}, "attention_impl must be one of"),
    ({"max_num_seqs": 0}, "max_num_seqs must be a positive int"),
    ({"max_num_seqs": -3}, "max_num_seqs"),
    ({"max_num_seqs": "4"}, "max_num_seqs"),
    ({"compiler": "aot_eager"}, "compiler must be one of"),
    ({"gemv": "yes"}, "gemv must be True or False"),
    ({"fuse_norm": None}, "fuse_norm must be True or False"),
    ({"regional_compile": 1}, "regional_compile must be True or False"),
])
def test_bad_values(options, match):
    with pytest.raises(ValueError, match=match):
        FullgraphConfig.from_options(options)


def _first_call(compiled):
    with torch.inference_mode():
        x = torch.randn(3, 4)
        torch._dynamo.mark_dynamic(x, 0)
        return compiled(x)


def test_bogus_option_raises_at_first_call():
    compiled = torch.compile(nn.Linear(4, 4), backend="fullgraph", options={"bogus": 1})  # lazy: no error yet
    with pytest.raises(Exception, match="unknown fullgraph option 'bogus'") as info:
        _first_call(compiled)
    assert "known options" in str(info.value)


def test_bad_value_through_torch_compile():
    compiled = torch.compile(nn.Linear(4, 4), backend="fullgraph", options={"cudagraph_mode": "sometimes"})
    with pytest.raises(Exception, match="cudagraph_mode must be one of"):
        _first_call(compiled)


def test_reduce_overhead_mode_is_an_error():
    compiled = torch.compile(nn.Linear(4, 4), backend="fullgraph", mode="reduce-overhead")
    with pytest.raises(Exception, match="takes no mode='reduce-overhead'") as info:
        _first_call(compiled)
    assert "cudagraph_mode" in str(info.value)


def test_default_mode_is_accepted():
    m = nn.Linear(4, 4).requires_grad_(False)
    compiled = torch.compile(m, backend="fullgraph", mode="default")
    with torch.inference_mode():
        x = torch.randn(3, 4)
        torch._dynamo.mark_dynamic(x, 0)
        torch.testing.assert_close(compiled(x), m(x))


def test_backend_found_through_entry_point_without_import():
    code = textwrap.dedent("""
        import sys
        import torch._dynamo
        from torch._dynamo.backends.registry import lookup_backend
        assert "fullgraph_backend" not in sys.modules, "imported before lookup"
        assert "fullgraph" in torch._dynamo.list_backends(), torch._dynamo.list_backends()
        fn = lookup_backend("fullgraph")
        assert fn.__module__ == "fullgraph_backend.backend" and fn.__name__ == "fullgraph", fn
        import torch
        m = torch.nn.Linear(4, 4).requires_grad_(False)
        c = torch.compile(m, backend="fullgraph", options={"compiler": "eager"})
        x = torch.randn(3, 4)
        torch._dynamo.mark_dynamic(x, 0)
        with torch.inference_mode():
            torch.testing.assert_close(c(x), m(x))
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")
