"""FX graph dumps (fullgraph_backend.dump): what is written, what the overview and the page show.

One Inductor compile (a module fixture) covers depyf and Inductor's trace; everything else
compiles with ``compiler="eager"`` to stay fast.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import threading
import warnings

import pytest
import torch
import torch.nn as nn
from rich.console import Console

from fullgraph_backend import use_forward_context
from fullgraph_backend.cli import main
from fullgraph_backend.config import FullgraphConfig
from fullgraph_backend.dump import DumpError, dump_compilation, load_dump, print_overview, warnings_of
from fullgraph_backend.dump import write_html
from fullgraph_backend.dump.compilation import dump_compilation as dump_compilation_fn
from fullgraph_backend.dump.leftovers import output_code_calls, post_grad_leftovers
from fullgraph_backend.dump.quiet import INDUCTOR_TRACE_LOGGER
from fullgraph_backend.dump.writer import GraphDump
from passes import PassManager

from helpers import ctx_for, own_block_tables, tiny_attention_model

GRAPH_FILES = ("graph.json", "00_dynamo_graph.py", "01_swap_attention.py", "passes.txt", "passes.json",
               "capture.json", "capture.txt")
INDUCTOR_FILES = ("fx_graph_readable.py", "fx_graph_transformed.py", "output_code.py")
PGO_NOTICE = "dynamo_pgo force disabled by torch.compiler.config.force_disable_caches"


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
    types = {i["name"]: i["type"] for i in piece["inputs"]}
    assert types["l_input_ids_"].startswith("int64[s")  # the token count: the batch symbol
    # the block count is read off the cache at run time (forward_context.SIZED_BY_LIMITS): an
    # unbacked size, so another num_kv_blocks finds this compiled graph
    assert re.fullmatch(r"float32\[2, u\d+, 16, 2, 8\]", types["fg_kv_cache_0"]), types["fg_kv_cache_0"]
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


# ---- a dump nobody vouches for --------------------------------------------------------------------
# A dump is a folder anyone may have written: these tamper with a real one (the MLP, compiled once)
# and check that reading it never runs markup, reads outside it, blocks, or raises anything but DumpError.
SECRET = "top secret: not part of the dump"


@pytest.fixture(scope="module")
def mlp_dump_source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mlp_dump") / "dump")
    compiled = torch.compile(MLP().eval(), backend="fullgraph",
                             options={"compiler": "eager", "capture_sizes": (4,), "dump_dir": root})
    with torch.inference_mode():
        compiled(torch.randn(4, 8))
    torch._dynamo.reset()
    return root


@pytest.fixture
def dump_dir(mlp_dump_source, tmp_path):
    """A fresh copy of the MLP dump, next to a file that must never be read: ``tmp_path / "secret.txt"``."""
    (tmp_path / "secret.txt").write_text(SECRET)
    return shutil.copytree(mlp_dump_source, tmp_path / "dump")


def edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def first_pass(dump_dir) -> dict:
    return json.loads((dump_dir / "0_0" / "passes.json").read_text())["passes"][0]


def cli_dump(dump_dir, tmp_path, capsys) -> tuple[int, str, str]:
    code = main(["dump", str(dump_dir), "--html", str(tmp_path / "page.html")])
    out, err = capsys.readouterr()
    return code, out, err


def test_html_escapes_everything_read_from_the_dump(dump_dir, tmp_path, capsys):
    attack = "<script>alert(1)</script><img src=x onerror=alert(2)>"

    def poison_passes(data):
        p = data["passes"][0]
        p.update(name=attack, summary=attack)
        p["report"] = {"swapped": [{"node": attack, "layer_idx": 0, "impl": attack, "reads": [attack]}],
                       "left_alone": [[attack, attack]]}

    edit_json(dump_dir / "0_0" / "passes.json", poison_passes)
    edit_json(dump_dir / "0_0" / "graph.json", lambda g: g.update(compile_id=attack, graph_break=attack))
    edit_json(dump_dir / "0_0" / "capture.json", lambda rows: rows[0].update(kind=attack))
    edit_json(dump_dir / "fullgraph_dump.json", lambda m: m.update(torch=attack))
    (dump_dir / "0_0" / first_pass(dump_dir)["graph"]).write_text(attack + "\n")
    code, _, err = cli_dump(dump_dir, tmp_path, capsys)
    assert code == 0, err
    page = (tmp_path / "page.html").read_text()
    assert not re.search(r"<script|<img|onerror=alert\(2\)>", page, re.I)
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 10  # shown, as text


@pytest.mark.parametrize("file, change, message", [
    ("fullgraph_dump.json", lambda m: m["graphs"][0].update(folder="../.."), r"graphs\[0\]\.folder .* outside"),
    ("fullgraph_dump.json", lambda m: m["graphs"][0].update(folder="/etc"), r"graphs\[0\]\.folder is an absolute"),
    ("0_0/passes.json", lambda p: p["passes"][0].update(graph="../../secret.txt"), r"passes\[0\]\.graph .* outside"),
    ("0_0/passes.json", lambda p: p["passes"][0].update(graph="/etc/hostname"), r"passes\[0\]\.graph is an absolute"),
    ("0_0/graph.json", lambda g: g["pieces"][0].update(inductor="..", output_code="../secret.txt"),
     r"pieces\[0\]\.output_code .* outside"),
    ("0_0/passes.json", lambda p: p["passes"][0].update(graph="x\0y"), r"passes\[0\]\.graph must be a path inside"),
])
def test_file_names_leading_outside_the_dump_are_refused(dump_dir, tmp_path, capsys, file, change, message):
    edit_json(dump_dir / file, change)
    with pytest.raises(DumpError, match=message):
        load_dump(str(dump_dir))
    code, out, err = cli_dump(dump_dir, tmp_path, capsys)
    assert code == 2 and SECRET not in out and not (tmp_path / "page.html").exists()
    assert err.startswith("fullgraph dump: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("planted", ["graph", "folder", "graph.json"])
def test_symlinks_pointing_outside_the_dump_are_refused(dump_dir, tmp_path, planted):
    folder = dump_dir / "0_0"
    if planted == "graph":
        target = folder / first_pass(dump_dir)["graph"]
        target.unlink()
        target.symlink_to(tmp_path / "secret.txt")
    elif planted == "folder":
        (tmp_path / "elsewhere").mkdir()
        shutil.move(str(folder), tmp_path / "elsewhere" / "0_0")
        folder.symlink_to(tmp_path / "elsewhere" / "0_0")
    else:
        (tmp_path / "graph.json").write_text((folder / "graph.json").read_text())
        (folder / "graph.json").unlink()
        (folder / "graph.json").symlink_to(tmp_path / "graph.json")
    with pytest.raises(DumpError, match="leads outside the dump folder"):
        load_dump(str(dump_dir))


def test_symlinks_inside_the_dump_are_followed(dump_dir, tmp_path):
    graph = dump_dir / "0_0" / first_pass(dump_dir)["graph"]
    graph.rename(dump_dir / "elsewhere.py")
    graph.symlink_to(dump_dir / "elsewhere.py")
    write_html(load_dump(str(dump_dir)), str(tmp_path / "page.html"))
    assert "elsewhere.py is missing" not in (tmp_path / "page.html").read_text()


def finishes(fn, seconds: float = 60.0):
    """``fn()``'s result or exception, or a failure if it is still running after ``seconds`` (blocked)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as e:  # handed to the test
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.mark.parametrize("name", ["fullgraph_dump.json", "0_0/graph.json", "0_0/00_dynamo_graph.py", "dynamo.json"])
def test_a_fifo_in_the_dump_is_an_error_not_a_hang(dump_dir, tmp_path, name):
    (dump_dir / name).unlink(missing_ok=True)
    os.mkfifo(dump_dir / name)
    with pytest.raises(DumpError, match=rf"{re.escape(name)} is not a regular file"):
        finishes(lambda: write_html(load_dump(str(dump_dir)), str(tmp_path / "page.html")))


def test_terminal_output_has_no_escapes_or_markup(dump_dir):
    ansi = "\x1b[31mred\x1b[0m \x1b]0;window title\x07 \x9b2J [bold red]markup[/] \u202eevil"

    def poison_passes(data):
        data["passes"][0].update(name=ansi, summary=ansi)
        data["passes"][0]["report"] = {"swapped": [{"node": ansi, "layer_idx": 0, "impl": ansi, "reads": [ansi]}],
                                       "left_alone": [[ansi, ansi]]}

    edit_json(dump_dir / "0_0" / "passes.json", poison_passes)
    edit_json(dump_dir / "0_0" / "graph.json", lambda g: g.update(compile_id=ansi, graph_break=ansi))
    edit_json(dump_dir / "0_0" / "capture.json", lambda rows: rows[0].update(kind=ansi))
    text = overview(load_dump(str(dump_dir)))
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]", text)
    assert "[bold red]markup[/]" in text and "red" in text and "window title" not in text


@pytest.mark.parametrize("file, change, message", [
    ("fullgraph_dump.json", lambda m: m.pop("graphs"), r"fullgraph_dump.json: the top level lacks the key 'graphs'"),
    ("fullgraph_dump.json", lambda m: m["graphs"].append(7), r"fullgraph_dump.json: graphs\[1\] must be an object"),
    ("fullgraph_dump.json", lambda m: m["graphs"][0].update(folder=0), r"graphs\[0\]\.folder must be a string"),
    ("0_0/graph.json", lambda g: g.update(pieces="all"), r"0_0/graph.json: pieces must be a list"),
    ("0_0/graph.json", lambda g: g["pieces"][0].update(aten_fallbacks={"aten.mm": "2"}),
     r"0_0/graph.json: pieces\[0\]\.aten_fallbacks\.aten\.mm must be an int"),
    ("0_0/graph.json", lambda g: g.update(config=[]), r"0_0/graph.json: config must be an object"),
    ("0_0/passes.json", lambda p: p["passes"][0].pop("name"), r"0_0/passes.json: passes\[0\] lacks the key 'name'"),
    ("0_0/passes.json", lambda p: p["passes"][0].update(report={"swapped": [{"node": "n"}]}),
     r"0_0/passes.json: passes\[0\]\.report\.swapped\[0\] lacks the key 'layer_idx'"),
    ("0_0/passes.json", lambda p: p["passes"][0].update(report={"swapped": [], "left_alone": [["n"]]}),
     r"passes\[0\]\.report\.left_alone\[0\] must be a list of 2"),
    ("0_0/capture.json", lambda rows: rows[0].update(size="big"), r"0_0/capture.json: \[0\]\.size must be an int"),
    ("0_0/capture.json", lambda rows: rows[0].pop("warmup_ms"), r"\[0\] lacks the key 'warmup_ms'"),
])
def test_missing_or_ill_typed_keys_name_the_file_and_key(dump_dir, tmp_path, capsys, file, change, message):
    edit_json(dump_dir / file, change)
    with pytest.raises(DumpError, match=message):
        load_dump(str(dump_dir))
    code, out, err = cli_dump(dump_dir, tmp_path, capsys)
    assert code == 2 and re.search(message, err) and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("name, text, message", [
    ("0_0/graph.json", "{not json", r"cannot read 0_0/graph.json"),
    ("0_0/passes.json", "[]", r"0_0/passes.json: the top level must be an object, got \[\]"),
    ("dynamo.json", '["0/0"]', r"dynamo.json: \[0\] must be an object"),
    ("fullgraph_dump.json", '"fullgraph-dump"', r"is not a fullgraph dump manifest"),
])
def test_unreadable_json_files_name_the_file(dump_dir, name, text, message):
    (dump_dir / name).write_text(text)
    with pytest.raises(DumpError, match=message):
        load_dump(str(dump_dir))


def test_cli_error_lines_carry_no_escapes(tmp_path, capsys):
    folder = tmp_path / "\x1b[31mred"
    folder.mkdir()
    assert main(["dump", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "red is not a fullgraph dump" in err


# ---- writing never goes through a planted link -------------------------------------------------
def plant_link(path, target) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(target)


def test_pass_manager_replaces_a_planted_symlink(tmp_path):
    folder = tmp_path / "graph"
    folder.mkdir()
    (tmp_path / "secret.txt").write_text(SECRET)
    for name in ("00_dynamo_graph.py", "passes.json"):
        plant_link(folder / name, tmp_path / "secret.txt")
    os.mkfifo(folder / "passes.txt")
    gm = torch.fx.symbolic_trace(MLP())
    finishes(lambda: PassManager([("noop", lambda g: "nothing")], str(folder)).run(gm))
    assert (tmp_path / "secret.txt").read_text() == SECRET
    for name in ("00_dynamo_graph.py", "passes.json", "passes.txt"):
        assert (folder / name).is_file() and not (folder / name).is_symlink(), name
    assert "def forward" in (folder / "00_dynamo_graph.py").read_text()


def test_dump_writer_replaces_planted_symlinks(tmp_path):
    root = tmp_path / "dump"
    (tmp_path / "secret.txt").write_text(SECRET)
    root.mkdir()
    plant_link(root / "0_0", tmp_path / "nowhere")  # a dangling link takes the name: the graph goes to 0_0.1
    compiled = torch.compile(MLP().eval(), backend="fullgraph",
                             options={"compiler": "eager", "capture_sizes": (4,), "dump_dir": str(root)})
    with torch.inference_mode():
        compiled(torch.randn(4, 8))
    folder = root / "0_0.1"
    dump = GraphDump(str(root), str(folder), json.loads((folder / "graph.json").read_text()))
    for name in ("graph.json", "capture.json", "capture.txt"):
        plant_link(folder / name, tmp_path / "secret.txt")
    dump.write_capture_table([])
    dump._save()
    assert (tmp_path / "secret.txt").read_text() == SECRET and not (tmp_path / "nowhere").exists()
    assert not any(p.is_symlink() for p in folder.iterdir())
    assert json.loads((folder / "capture.json").read_text()) == []


def test_a_fifo_planted_where_dump_compilation_reads_is_an_error_not_a_hang(tmp_path):
    os.mkfifo(tmp_path / "dynamo.json")
    compiled = torch.compile(MLP().eval(), backend="fullgraph", options={"compiler": "eager", "capture_sizes": (4,)})

    def run():
        with torch.inference_mode(), dump_compilation(str(tmp_path)):
            compiled(torch.randn(4, 8))

    with pytest.raises(DumpError, match="dynamo.json is not a regular file"):
        finishes(run)


def test_a_depyf_folder_linked_outside_the_dump_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "dump").mkdir()
    (tmp_path / "dump" / "depyf").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DumpError, match="depyf .* leads outside the dump folder"):
        with dump_compilation(str(tmp_path / "dump")):
            pass
    assert not list((tmp_path / "elsewhere").iterdir())


# ---- quiet while dumping ------------------------------------------------------------------------------
class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_dumping_silences_the_third_party_notices_and_nothing_else(tmp_path):
    torch._dynamo.utils.warn_once_cache.discard(PGO_NOTICE)  # an earlier test may have used up its one warning
    inductor_log, records = logging.getLogger(INDUCTOR_TRACE_LOGGER), Records()
    inductor_log.addHandler(records)
    compiled = torch.compile(MLP().eval(), backend="fullgraph", options={"compiler": "eager", "capture_sizes": (4,)})
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with torch.inference_mode(), dump_compilation(str(tmp_path)):
                compiled(torch.randn(4, 8))
                warnings.warn("ours", UserWarning)
                inductor_log.warning("%s debug trace: %s", "graph_0", tmp_path)
                inductor_log.warning("a real problem")
            warnings.warn(PGO_NOTICE, UserWarning)  # after the dump: shown again
    finally:
        inductor_log.removeHandler(records)
    shown = [str(w.message) for w in seen]
    assert "ours" in shown and shown.count(PGO_NOTICE) == 1
    assert not any("You are trying to debug" in m for m in shown)
    assert records.messages == ["a real problem"]
