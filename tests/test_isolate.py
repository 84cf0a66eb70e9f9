"""tools/isolate.py: the benchmark tools' modes, each measured in a fresh process."""
from __future__ import annotations

import os
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

from isolate import child_argv, median_row, run_modes  # noqa: E402

STUB = textwrap.dedent('''
    import argparse, json, os, sys
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes")
    parser.add_argument("--out")
    parser.add_argument("--batches")
    parser.add_argument("--log")  # each process appends its mode; its turn is the line count
    parser.add_argument("--one-process", action="store_true", required=True)  # what run_modes' children get
    args = parser.parse_args()
    if args.modes == "bad":
        sys.exit(3)
    if args.modes in ("hangs", "hangs-after-one"):
        import time
        if args.modes == "hangs-after-one":  # the tools write their result after each row
            with open(os.path.join(args.out, "result.json"), "w") as f:
                json.dump({"device": "stub", "rows": [{"mode": args.modes, "batch": 1, "ms": 2.0}]}, f)
        time.sleep(600)
    turn = 0
    if args.log:
        with open(args.log, "a") as f:
            f.write(args.modes + "\\n")
        with open(args.log) as f:
            turn = len(f.read().split())
    row = {"mode": args.modes, "batch": 1, "pid": os.getpid(), "batches": args.batches, "ms": float(turn), "ok": True}
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump({"device": "stub", "rows": [row]}, f)
''')


def test_child_argv_replaces_modes_and_out_in_either_spelling_and_runs_the_mode_in_the_child():
    assert child_argv(["--modes", "a,b", "--batches", "1,8", "--out=x", "--rounds", "3"], "b", "/o") == \
        ["--batches", "1,8", "--rounds", "3", "--one-process", "--modes", "b", "--out", "/o"]
    assert child_argv(["--modes=a,b", "--out", "x", "--one-process"], "a", "/o") == \
        ["--one-process", "--modes", "a", "--out", "/o"]


def test_each_mode_runs_in_a_process_of_its_own_and_a_failure_keeps_the_rest(tmp_path):
    script = tmp_path / "stub.py"
    script.write_text(STUB)
    header, rows = run_modes(str(script), ["--modes", "x,bad,y", "--batches", "1,8", "--out", "ignored"],
                             ["x", "bad", "y"], "result.json", [1, 8])
    assert header == {"device": "stub"}
    assert [r["mode"] for r in rows] == ["x", "bad", "bad", "y"]
    assert [r["batch"] for r in rows[1:3]] == [1, 8]  # the failed mode: a row per batch, as the tables read
    assert all("exited with code 3" in r["error"] for r in rows[1:3])
    pids = {rows[0]["pid"], rows[3]["pid"], os.getpid()}
    assert len(pids) == 3, "the modes shared a process"
    assert rows[0]["batches"] == rows[3]["batches"] == "1,8"


def test_a_mode_past_the_timeout_is_stopped_and_the_rest_go_on(tmp_path):
    script = tmp_path / "stub.py"
    script.write_text(STUB)
    _, rows = run_modes(str(script), [], ["hangs", "x"], "result.json", [1, 8], timeout=3)
    assert [r["mode"] for r in rows] == ["hangs", "hangs", "x"]
    assert all(r["error"] == "its process ran past --mode-timeout 3 s and was stopped" for r in rows[:2])
    assert rows[2]["ok"] is True


def test_a_stopped_mode_keeps_the_rows_it_wrote_before_the_stop(tmp_path):
    script = tmp_path / "stub.py"
    script.write_text(STUB)
    _, rows = run_modes(str(script), [], ["hangs-after-one"], "result.json", [1, 8], timeout=3)
    assert rows[0] == {"mode": "hangs-after-one", "batch": 1, "ms": 2.0}
    assert rows[1] == {"mode": "hangs-after-one", "batch": 8,
                       "error": "its process ran past --mode-timeout 3 s and was stopped"}
    assert len(rows) == 2


def test_rounds_alternate_the_order_and_give_each_numbers_median(tmp_path):
    """Three rounds of x, y: x y, then y x, then x y; each process reports its turn (1..6), so x
    measured 1, 4, 5 and y 2, 3, 6."""
    script, log = tmp_path / "stub.py", tmp_path / "order.log"
    script.write_text(STUB)
    _, rows = run_modes(str(script), ["--log", str(log)], ["x", "y"], "result.json", [1], rounds=3)
    assert log.read_text().split() == ["x", "y", "y", "x", "x", "y"]
    assert [(r["mode"], r["ms"], r["ms_rounds"], r["rounds"]) for r in rows] == \
        [("x", 4.0, [1.0, 4.0, 5.0], 3), ("y", 3.0, [2.0, 3.0, 6.0], 3)]
    assert rows[0]["ok"] is True and "ok_rounds" not in rows[0]


def test_a_rounds_row_is_the_median_of_the_rounds_that_measured():
    rows = [{"mode": "m", "batch": 8, "tpot_ms": 3.0, "graphs": 2},
            {"mode": "m", "batch": 8, "error": "its process exited with code 1 and wrote no result"},
            {"mode": "m", "batch": 8, "tpot_ms": 2.0, "graphs": 2},
            {"mode": "m", "batch": 8, "tpot_ms": 2.2, "graphs": 2}]
    merged = median_row(rows)
    assert merged == {"mode": "m", "batch": 8, "tpot_ms": 2.2, "tpot_ms_rounds": [3.0, 2.0, 2.2], "graphs": 2,
                      "graphs_rounds": [2, 2, 2], "rounds": 3}
    assert median_row(rows[1:2])["error"].startswith("its process exited")
    two = median_row([{"mode": "m", "batch": 1, "tpot_ms": 2.0, "graphs": 3},
                      {"mode": "m", "batch": 1, "tpot_ms": 3.0, "graphs": 2}])
    assert two["tpot_ms"] == 2.5 and two["graphs"] == 2 and isinstance(two["graphs"], int)  # a count stays whole
    assert median_row([{"mode": "m", "batch": 1, "x_floor": 1.82}, {"mode": "m", "batch": 1, "x_floor": 1.83}])[
        "x_floor"] == 1.825  # as printed in the table, not 1.8250000000000002


def _fake_children(monkeypatch, module, rows, **header):
    """Replace ``module``'s ``run_modes`` by one returning ``rows``; the calls it got."""
    calls = []

    def fake(script, argv, modes, result_name, batches, rounds=1, timeout=None):
        calls.append((os.path.basename(script), modes, result_name, batches))
        return {"device": "stub GPU", "torch": "x", **header}, rows

    monkeypatch.setattr(module, "run_modes", fake)
    return calls


def test_bench_decode_runs_modes_apart_and_merges_their_rows(monkeypatch, tmp_path, capsys):
    import json

    import bench_decode

    rows = [{"mode": "full", "batch": 1, "gpu_ms": 1.5, "x_floor": 2.0, "floor_ms": 0.75},
            *({"mode": "full+nopdl", "batch": b, "error": "its process exited with code 1 and wrote no result"}
              for b in (1, 16))]
    calls = _fake_children(monkeypatch, bench_decode, rows, triton="t", date="d", model="m", dtype="bf16", context=1,
                           attention_impl="triton", copy_bandwidth_TBs=4.2)
    monkeypatch.setattr(bench_decode, "plot_decode", lambda result, path: None)
    monkeypatch.setattr(sys, "argv", ["bench_decode.py", "--modes", "full,full+nopdl", "--batches", "1,16",
                                      "--out", str(tmp_path)])
    bench_decode.main()
    assert calls == [("bench_decode.py", ["full", "full+nopdl"], "bench_decode.json", [1, 16])]
    result = json.loads((tmp_path / "bench_decode.json").read_text())
    assert "one process per mode" in result["command"]
    assert [(r["mode"], r["batch"]) for r in result["rows"]] == [("full", 1), ("full+nopdl", 1), ("full+nopdl", 16)]
    assert "| full+nopdl | error | error |" in capsys.readouterr().out


def test_bench_decode_takes_a_projection_to_cublas_by_weight_shape(monkeypatch, tmp_path, capsys):
    """``+cublas_OP`` is a known suffix for each projection name and an unknown one is a usage error;
    the rule it installs refuses exactly that projection's weight shape (Qwen2.5-1.5B's o_proj)."""
    import bench_decode
    import torch

    calls = _fake_children(monkeypatch, bench_decode, [], triton="t", date="d", model="m", dtype="bf16", context=1,
                           attention_impl="triton", copy_bandwidth_TBs=4.2)
    monkeypatch.setattr(bench_decode, "plot_decode", lambda result, path: None)
    monkeypatch.setattr(sys, "argv", ["bench_decode.py", "--modes", "full,full+cublas_o_proj+cublas_qkv", "--batches",
                                      "16", "--out", str(tmp_path)])
    bench_decode.main()
    assert calls[0][1] == ["full", "full+cublas_o_proj+cublas_qkv"]
    for bad in ("cublas_mlp", "xxxxxxxqkv"):
        monkeypatch.setattr(sys, "argv", ["bench_decode.py", "--modes", f"full+{bad}", "--out", str(tmp_path)])
        with pytest.raises(SystemExit):
            bench_decode.main()
        assert bad in capsys.readouterr().err
    rule = bench_decode.sparing(lambda x, weight, bias=None: True, {(1536, 1536)})
    x = torch.empty(4, 1536)
    assert not rule(x, torch.empty(1536, 1536)) and rule(x, torch.empty(2048, 1536))
    assert bench_decode.sparing(len, set()) is len  # no flag: the library's rule itself


def test_bench_transformers_merges_rows_without_touching_cuda(monkeypatch, tmp_path, capsys):
    import json

    import bench_transformers

    rows = [{"mode": "engine", "batch": 1, "tpot_ms": 1.6}, *({"mode": "engine-hf", "batch": b, "error": "exited"}
                                                             for b in (1, 8))]
    calls = _fake_children(monkeypatch, bench_transformers, rows)
    monkeypatch.setattr(sys, "argv", ["bench_transformers.py", "--modes", "engine,engine-hf", "--batches", "1,8",
                                      "--out", str(tmp_path)])
    bench_transformers.main()
    assert calls == [("bench_transformers.py", ["engine", "engine-hf"], "bench_transformers_llama-3.2-1b.json", [1, 8])]
    result = json.loads((tmp_path / "bench_transformers_llama-3.2-1b.json").read_text())
    assert result["device"] == "stub GPU" and "one process per mode" in result["command"]
    assert [(r["mode"], r["batch"]) for r in result["rows"]] == [("engine", 1), ("engine-hf", 1), ("engine-hf", 8)]
    out = capsys.readouterr().out
    assert "batch 1: engine 1.60 | engine-hf failed" in out


def test_bench_transformers_fullgraph_flags_change_one_option_each(monkeypatch, tmp_path, capsys):
    """``fullgraph+nogqa`` beside ``fullgraph`` in one command (so in the same rounds); flags add to
    ``--options``; an unknown flag, or one on another mode, is refused naming the known ones."""
    import bench_transformers

    assert bench_transformers.mode_options("fullgraph", {"gemv": False}) == ("fullgraph", {"gemv": False})
    assert bench_transformers.mode_options("fullgraph+nogqa+nopdl", {"gemv": False}) == (
        "fullgraph", {"gemv": False, "group_query_heads": False, "pdl": False})
    assert bench_transformers.mode_options("hf-compiled", None) == ("hf-compiled", None)
    assert bench_transformers.mode_options("fullgraph+nofewrows", None) == ("fullgraph", {})  # a module setting
    assert bench_transformers.unknown_modes(["fullgraph+nofewrows", "fullgraph+fast"]) == ["fullgraph+fast"]
    calls = _fake_children(monkeypatch, bench_transformers, [])
    monkeypatch.setattr(sys, "argv", ["bench_transformers.py", "--modes", "fullgraph,fullgraph+nogqa,hf-compiled",
                                      "--out", str(tmp_path)])
    bench_transformers.main()
    assert calls[0][1] == ["fullgraph", "fullgraph+nogqa", "hf-compiled"]
    for bad in ("fullgraph+fast", "hf-compiled+nogqa"):
        monkeypatch.setattr(sys, "argv", ["bench_transformers.py", "--modes", bad, "--out", str(tmp_path)])
        with pytest.raises(SystemExit):
            bench_transformers.main()
        assert f"unknown mode(s) ['{bad}']" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["bench_decode", "bench_transformers"])
def test_rounds_below_one_are_refused(tool, monkeypatch, capsys):
    module = __import__(tool)
    monkeypatch.setattr(sys, "argv", [f"{tool}.py", "--out", "x", "--rounds", "0"])
    with pytest.raises(SystemExit):
        module.main()
    assert "--rounds takes a whole number of at least 1, not '0'" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["bench_decode", "bench_transformers"])
def test_one_mode_with_rounds_runs_in_processes_of_its_own(tool, monkeypatch, tmp_path):
    """``--rounds 3`` of a single mode (a backend option against the default, one command each) runs
    its rounds apart like several modes do; the children get ``--one-process`` (child_argv) and so
    measure it themselves."""
    module = __import__(tool)
    calls = _fake_children(monkeypatch, module, [], triton="t", date="d", model="m", dtype="bf16", context=1,
                           attention_impl="triton", copy_bandwidth_TBs=4.2)
    if tool == "bench_decode":
        monkeypatch.setattr(module, "plot_decode", lambda result, path: None)
    monkeypatch.setattr(sys, "argv", [f"{tool}.py", "--modes", "full" if tool == "bench_decode" else "fullgraph",
                                      "--batches", "8", "--rounds", "3", "--out", str(tmp_path)])
    module.main()
    assert len(calls) == 1 and calls[0][1] == (["full"] if tool == "bench_decode" else ["fullgraph"])
