"""FX graph dumps (fullgraph_backend.dump): what is written, what the overview and the page show.

One Inductor compile (a module fixture) covers depyf and Inductor's trace; everything else
compiles with ``compiler="eager"`` to stay fast.
"""
from __future__ import annotations

import io
import json
import os
import re

import pytest
import torch
import torch.nn as nn
from rich.console import Console

from fullgraph_backend import use_forward_context
from fullgraph_backend.cli import main
from fullgraph_backend.config import FullgraphConfig
from fullgraph_backend.dump import DumpError, dump_compilation, load_dump, print_overview, warnings_of
from fullgraph_backend.dump.compilation import dump_compilation as dump_compilation_fn
from fullgraph_backend.dump.leftovers import output_code_calls, post_grad_leftovers

from conftest import ctx_for, own_block_tables, tiny_attention_model

GRAPH_FILES = ("graph.json", "00_dynamo_graph.py", "01_swap_attention.py", "passes.txt", "passes.json",
               "capture.json", "capture.txt")
INDUCTOR_FILES = ("fx_graph_readable.py", "fx_graph_transformed.py", "output_code.py")


def run_attention_model(compiled, ctx, query_lens=(3, 2)):
    with use_forward_context(ctx), torch.inference_mode():
        positions = ctx.prepare(list(query_lens), list(query_lens), own_block_tables(ctx, len(query_lens)))
        ids = torch.randint(0, 64, (sum(query_lens),))
        torch._dynamo.mark_dynamic(ids, 0)
        torch._dynamo.mark_dynamic(positions, 0)
        return compiled(ids, positions)


class MLP(nn.Module):
    def __init__(self, graph_break: bool = False):
        super().__init__()
        self.up, self.down, self.graph_break = nn.Linear(8, 16), nn.Linear(16, 8), graph_break

    def forward(self, x):
        x = torch.relu(self.up(x))
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.down(x)


def overview(dump) -> str:
    console = Console(file=io.StringIO(), width=240)
    print_overview(dump, console)
    return console.file.getvalue()


@pytest.fixture(scope="module")
def attention_dump(tmp_path_factory):
    """The tiny attention model compiled once with Inductor inside dump_compilation (no option)."""
    torch._dynamo.reset()
    root = str(tmp_path_factory.mktemp("attention_dump"))
    model = tiny_attention_model(layers=2)
    ctx = ctx_for(model)
    compiled = torch.compile(model, backend="fullgraph", options={"capture_sizes": (4, 8)})
    with dump_compilation(root):
        run_attention_model(compiled, ctx)
    torch._dynamo.reset()
    return root


# ---- producing ------------------------------------------------------------------------------------
def test_inductor_dump_holds_every_file(attention_dump):
    manifest = json.load(open(os.path.join(attention_dump, "fullgraph_dump.json")))
    assert [g["compile_id"] for g in manifest["graphs"]] == ["0/0"]
    folder = os.path.join(attention_dump, "0_0")
    files = manifest["graphs"][0]["files"]
    pass_files = [p["graph"] for p in json.load(open(os.path.join(folder, "passes.json")))["passes"]]
    for name in (*GRAPH_FILES, *pass_files):
        assert os.path.isfile(os.path.join(folder, name)) and name in files, name
    traces = [f for f in files if f.startswith("torchinductor/")]
    for name in INDUCTOR_FILES:
        assert any(f.endswith("/" + name) for f in traces), name
    depyf = manifest["depyf"]
    for pattern in (r"full_code_for_forward_\d+\.py", r"__transformed_code_\d+_for_forward\.py",
                    r"__compiled_fn_\d+\.kernel_\d+\.py", r"__compiled_fn_\d+\.AFTER_POST_GRAD\.\d+\.py"):
        assert any(re.fullmatch("depyf/" + pattern, f) for f in depyf), pattern
    assert all(os.path.isfile(os.path.join(attention_dump, f)) for f in depyf)
    dynamo = json.load(open(os.path.join(attention_dump, "dynamo.json")))
    assert [r["compile_id"] for r in dynamo] == ["0/0"] and dynamo[0]["function"] == "forward"


def test_inductor_dump_records_swaps_leftovers_and_captures(attention_dump):
    graph = json.load(open(os.path.join(attention_dump, "0_0", "graph.json")))
    assert graph["compile_id"] == "0/0" and graph["graph_break"] is None
    (piece,) = graph["pieces"]
    names = [i["name"] for i in piece["inputs"]]
    assert {"fg_kv_cache_0", "fg_kv_cache_1", "fg_slot_mapping"} <= set(names)
    assert any(i["symbolic"] for i in piece["inputs"]) and not next(
        i for i in piece["inputs"] if i["name"] == "fg_kv_cache_0")["symbolic"]
    assert piece["kv_cache_clones"] == [] and piece["kv_cache_copy_backs"] == []  # reinplaced
    assert piece["auto_functionalized"] == 0
    assert piece["custom_op_calls"] == {"fullgraph.reference_attention": 2}
    assert sum(piece["generated_kernels"].values()) >= 1
    capture = json.load(open(os.path.join(attention_dump, "0_0", "capture.json")))
    assert [(r["size"], r["kind"], r["pool_mib"]) for r in capture] == [(8, "mixed", 0.0), (4, "mixed", 0.0)]
    assert all(r["warmup_ms"] > 0 and r["capture_ms"] > 0 for r in capture)


def test_option_alone_dumps_generic_model_per_compile_id(tmp_path):
    root = str(tmp_path / "mlp")
    compiled = torch.compile(MLP().eval(), backend="fullgraph",
                             options={"compiler": "eager", "capture_sizes": (4, 8), "dump_dir": root})
    with torch.inference_mode():
        x = torch.randn(3, 8)
        torch._dynamo.mark_dynamic(x, 0)
        compiled(x)
    manifest = json.load(open(os.path.join(root, "fullgraph_dump.json")))
    assert [(g["compile_id"], g["folder"]) for g in manifest["graphs"]] == [("0/0", "0_0")]
    assert manifest["depyf"] == [] and manifest["dynamo"] is None  # those need dump_compilation
    assert set(GRAPH_FILES) <= set(manifest["graphs"][0]["files"])
    graph = json.load(open(os.path.join(root, "0_0", "graph.json")))
    assert graph["config"]["compiler"] == "eager" and graph["pieces"][0]["inductor"] is None
    assert [r["size"] for r in json.load(open(os.path.join(root, "0_0", "capture.json")))] == [4]  # the key used
    assert "no attention nodes" in open(os.path.join(root, "0_0", "passes.txt")).read()


def test_environment_variable_is_the_default_dump_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FULLGRAPH_DUMP_DIR", str(tmp_path / "env"))
    assert FullgraphConfig.from_options({}).dump_dir == str(tmp_path / "env")
    assert FullgraphConfig.from_options({"dump_dir": str(tmp_path / "opt")}).dump_dir == str(tmp_path / "opt")
    compiled = torch.compile(MLP().eval(), backend="fullgraph", options={"compiler": "eager", "capture_sizes": (4,)})
    with torch.inference_mode():
        compiled(torch.randn(4, 8))
    assert [g["folder"] for g in load_dump(str(tmp_path / "env")).manifest["graphs"]] == ["0_0"]
    monkeypatch.delenv("FULLGRAPH_DUMP_DIR")
    assert FullgraphConfig.from_options({}).dump_dir is None


def test_piecewise_dump_records_each_compiled_piece(tmp_path):
    model = tiny_attention_model(layers=2)
    ctx = ctx_for(model)
    compiled = torch.compile(model, backend="fullgraph", options={
        "compiler": "eager", "cudagraph_mode": "piecewise", "capture_sizes": (8,), "dump_dir": str(tmp_path)})
    run_attention_model(compiled, ctx)
    graph = json.load(open(tmp_path / "0_0" / "graph.json"))
    assert len(graph["pieces"]) == 3  # before, between and after the two attention calls
    assert graph["config"]["cudagraph_mode"] == "piecewise"


def test_docstring_example_runs(tmp_path, monkeypatch):
    example = re.search(r"::\n\n(.*?)\n\n    Inside", dump_compilation_fn.__doc__, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile("\n".join(line[8:] for line in example.splitlines()), "example", "exec"), {})
    dump = load_dump(str(tmp_path / "dump"))
    assert [g.compile_id for g in dump.graphs] == ["0/0"] and dump.manifest["depyf"]


# ---- reading --------------------------------------------------------------------------------------
def test_overview_names_every_swapped_attention_node(attention_dump):
    dump = load_dump(attention_dump)
    swapped, left = dump.graphs[0].swaps
    assert [s["layer_idx"] for s in swapped] == [0, 1] and left == []
    text = overview(dump)
    after = open(os.path.join(attention_dump, "0_0", "01_swap_attention.py")).read()
    for s in swapped:
        assert s["node"] in after and s["node"] in text
        assert f"fg_kv_cache_{s['layer_idx']}" in s["reads"] and "fg_block_table" in s["reads"]
    assert "reference" in text and "capture" in text and "no warnings" in text
    assert "fullgraph.reference_attention x2" in text


def test_graph_break_and_recompile_are_reported(tmp_path):
    root = str(tmp_path / "break")
    compiled = torch.compile(MLP(graph_break=True).eval(), backend="fullgraph",
                             options={"compiler": "eager", "capture_sizes": (4, 8)})
    with torch.inference_mode(), dump_compilation(root):
        compiled(torch.randn(3, 8))
        compiled(torch.randn(5, 8))  # a new static size: both frames recompile (dynamic)
    dump = load_dump(root)
    assert [g.compile_id for g in dump.graphs] == ["0/0", "1/0", "0/1", "1/1"]
    assert dump.graphs[0].record["graph_break"] and dump.graphs[1].record["graph_break"] is None
    found = warnings_of(dump)
    breaks = [w for w in found if w.startswith("graph break")]
    assert len(breaks) == 2 and all("graph_break" in w for w in breaks)  # points at the call
    assert sum(w.startswith("recompile") for w in found) == 2
    text = overview(dump)
    assert "break" in text and "torch_dynamo_resume_in_forward" in text and "recompile" in text


def test_missing_or_foreign_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(DumpError, match="no such folder"):
        load_dump(str(tmp_path / "missing"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("hi")
    with pytest.raises(DumpError, match="not a fullgraph dump"):
        load_dump(str(tmp_path / "foreign"))
    assert main(["dump", str(tmp_path / "missing")]) == 2
    assert main(["dump", str(tmp_path / "foreign")]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "not a fullgraph dump" in err and "fullgraph_dump.json" in err


def test_cli_dump_prints_overview_and_writes_html(attention_dump, tmp_path, capsys):
    page = tmp_path / "dump.html"
    assert main(["dump", attention_dump, "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert "graph 0/0" in out and "warnings" in out
    html = page.read_text()
    assert "<h2>graph 0/0</h2>" in html
    passes = load_dump(attention_dump).graphs[0].passes
    for name in ("00_dynamo_graph.py", "output_code.py", *(p["graph"] for p in passes)):
        assert name in html
    assert html.count('<table class="diff"') == len(passes)  # one side-by-side table per pass
    for s in load_dump(attention_dump).graphs[0].swaps[0]:
        assert s["node"] in html
    assert not re.search(r"<script|<link|src=|@import", html)  # self-contained


def test_html_has_a_section_per_graph(tmp_path):
    root = str(tmp_path / "break")
    compiled = torch.compile(MLP(graph_break=True).eval(), backend="fullgraph",
                             options={"compiler": "eager", "capture_sizes": (4,), "dump_dir": root})
    with torch.inference_mode():
        compiled(torch.randn(4, 8))
    page = tmp_path / "page.html"
    assert main(["dump", root, "--html", str(page)]) == 0
    html = page.read_text()
    assert "<h2>graph 0/0</h2>" in html and "<h2>graph 1/0</h2>" in html and "graph break" in html


# ---- leftovers --------------------------------------------------------------------------------------
def test_leftovers_flag_kv_cache_clones_and_copy_backs():
    names = {"arg0_1": "l_x_", "arg1_1": "fg_kv_cache_0", "arg2_1": "fg_slot_mapping"}
    post_grad = """
        clone: "f32[2, 9, 16, 1, 16]" = torch.ops.aten.clone.default(arg1_1)
        out = torch.ops.fullgraph.reference_attention.default(arg0_1, arg0_1, arg0_1, clone, arg2_1)
        copy_: "f32[2, 9, 16, 1, 16]" = torch.ops.aten.copy_.default(arg1_1, clone)
        copy__1: "f32[2, 9, 16, 1, 16]" = torch.ops.aten.copy_.default(arg1_1, arg1_1)
    """
    found = post_grad_leftovers(post_grad, names)
    assert found["kv_cache_clones"] == ["fg_kv_cache_0"] and found["kv_cache_copy_backs"] == ["fg_kv_cache_0"]
    code = """
def call(self, args):
    arg0_1, arg1_1, arg2_1 = args
    buf0 = empty_strided_cpu((4, 4), (4, 1), torch.float32)
    extern_kernels.mm(arg0_1, arg0_1, out=buf0)
    buf1 = torch.ops.aten.clone.default(arg1_1)
    buf2 = torch.ops.fullgraph.reference_attention.default(buf0, buf1)
    buf3 = aten.nonzero.default(buf0)
    arg1_1.copy_(buf1)
    return (buf2, )
def get_args():
    pass
"""
    calls = output_code_calls(code, names)
    assert calls["extern_kernels"] == {"mm": 1}
    assert calls["custom_op_calls"] == {"fullgraph.reference_attention": 1}
    assert calls["aten_fallbacks"] == {"aten.clone": 1, "aten.nonzero": 1}
    assert calls["kv_cache_copies_in_output_code"] == 2
