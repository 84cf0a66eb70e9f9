"""Plots for docs/benchmarks.md, from the JSON the benchmark scripts write.

Usage: python tools/plot_results.py RESULT.json OUT.png   (the kind is read from the JSON)
       python tools/plot_results.py --history OUT.png DECODE.json...   (tools/bench_decode.py's runs, in order)
"""
from __future__ import annotations

import json
import os
import sys


# issue 15's targets: the step at most this many times the floor, by batch, and this many times faster
# than reduce-overhead at every batch
ISSUE_15_FLOOR_TARGETS = {1: 1.35, 16: 1.5, 64: 1.5}
ISSUE_15_SPEEDUP_TARGET = 1.3


def _subplots(*args, **kwargs):
    """``matplotlib.pyplot.subplots`` on the file-only Agg backend, imported here so the benchmark
    tools import without matplotlib (the ``bench`` extra; the tests import them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float]]) -> dict[str, list[float]]:
    """One group of bars per entry of ``groups``, one bar per series in each (labelled for the
    legend); returns each series' bar positions."""
    width = 0.8 / max(len(series), 1)
    positions = {}
    for i, (label, values) in enumerate(series.items()):
        positions[label] = [j + i * width for j in range(len(groups))]
        ax.bar(positions[label], values, width, label=label)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(groups))], groups)
    return positions


def plot_decode(result: dict, path: str) -> None:
    """Grouped bars: ms per decode step by batch, one bar per mode, plus the HBM floor."""
    rows = [r for r in result["rows"] if "gpu_ms" in r]
    batches = sorted({r["batch"] for r in rows})
    modes = [*dict.fromkeys(r["mode"] for r in rows), "HBM floor"]
    series = {}
    for mode in modes:
        values = []
        for b in batches:
            match = [r for r in rows if r["batch"] == b]
            hit = [r for r in match if r["mode"] == mode]
            values.append(match[0]["floor_ms"] if mode == "HBM floor" else hit[0]["gpu_ms"] if hit else 0)
        series[mode] = values
    fig, ax = _subplots(figsize=(9, 4.5))
    _grouped_bars(ax, [f"batch {b}" for b in batches], series)
    ax.set_yscale("log")
    ax.set_ylabel("ms per decode step (log)")
    ax.set_title(f"{result['model']} decode, context {result['context']}, {result['device']}, torch {result['torch']}")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_dynamic(result: dict, path: str) -> None:
    """Two panels: steady median per call, and total time including compile and capture."""
    modes = [m for m, e in result["modes"].items() if "steady_median_ms" in e]
    fig, (left, right) = _subplots(1, 2, figsize=(9, 3.8))
    left.bar(modes, [result["modes"][m]["steady_median_ms"] for m in modes], color="tab:blue")
    left.set_ylabel("steady median ms per call")
    right.bar(modes, [result["modes"][m]["total_s"] for m in modes], color="tab:orange")
    right.set_ylabel(f"total s for {result['calls']} calls")
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"{result['distinct_sizes']} distinct batch sizes, {result['device']}, torch {result['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_serving(result: dict, path: str) -> None:
    """Two panels, one bar group per request rate and one bar per -O level: median (P99 as a tick)
    TPOT, and median TTFT."""
    levels = list(result["levels"])
    rates = list(next(iter(result["levels"].values()))["rates"]) if levels else []
    groups = [f"{r} req/s" for r in rates]
    per_level = {f"-O{level}": [result["levels"][level]["rates"][r] for r in rates] for level in levels}
    fig, (left, right) = _subplots(1, 2, figsize=(10, 4))
    positions = _grouped_bars(left, groups, {k: [m["median_tpot_ms"] for m in v] for k, v in per_level.items()})
    for label, per_rate in per_level.items():
        left.scatter(positions[label], [m["p99_tpot_ms"] for m in per_rate], marker="_", s=200, color="black")
    _grouped_bars(right, groups, {k: [m["median_ttft_ms"] for m in v] for k, v in per_level.items()})
    for ax, label in ((left, "median TPOT ms (tick: P99)"), (right, "median TTFT ms")):
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']}, {result['num_prompts']} prompts, {result['input_len']} in / "
                 f"{result['output_len']} out, {result['device']}, torch {result['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_attention(result: dict, path: str) -> None:
    """Decode attention: effective TB/s by batch, one bar per mode, with the 2.5 TB/s goal."""
    rows = [r for r in result["rows"] if r["phase"] == "decode" and "TB/s" in r and r["mode"] != "reference"]
    batches = list(dict.fromkeys(r["shape"] for r in rows))
    series = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        hits = [[r["TB/s"] for r in rows if r["shape"] == b and r["mode"] == mode] for b in batches]
        series[mode] = [h[0] if h else 0 for h in hits]
    fig, ax = _subplots(figsize=(9, 4.5))
    _grouped_bars(ax, batches, series)
    ax.axhline(2.5, color="black", linestyle="--", linewidth=1, label="goal at batch >= 8")
    ax.set_ylabel("effective TB/s (K/V bytes / time)")
    ax.set_title(f"decode attention, {result['shapes']}, {result['device']}, torch {result['torch']}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_transformers(result: dict, path: str) -> None:
    """Time per decode step by batch, one bar per way of running transformers' decode (log scale
    where one is 5x another, as eager is; else linear from 0, so bar heights compare), each bar
    labelled with its value: the per-step clock (``step_ms``) where every row has it, else TPOT."""
    rows = [r for r in result["rows"] if "tpot_ms" in r]
    metric = "step_ms" if all("step_ms" in r for r in rows) else "tpot_ms"
    batches = sorted({r["batch"] for r in rows})
    series = {mode: [next((r[metric] for r in rows if r["mode"] == mode and r["batch"] == b), 0) for b in batches]
              for mode in dict.fromkeys(r["mode"] for r in rows)}
    fig, ax = _subplots(figsize=(9, 4.5))
    positions = _grouped_bars(ax, [f"batch {b}" for b in batches], series)
    for label, values in series.items():
        for x, value in zip(positions[label], values):
            if value:
                ax.annotate(f"{value:.2f}", (x, value), ha="center", va="bottom", fontsize=7)
    measured = [v for values in series.values() for v in values if v]
    log = bool(measured) and max(measured) > 5 * min(measured)  # a run whose every row failed plots empty
    if log:
        ax.set_yscale("log")
    unit = "ms between decode steps" if metric == "step_ms" else "ms per output token"
    ax.set_ylabel(unit + (" (log)" if log else ""))
    ax.set_title(f"{result['model']} shapes, prompt {result['prompt_len']}, {result['device']}, torch {result['torch']}, "
                 f"transformers {result['transformers']}", fontsize=9)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def tp_all_reduce(row: dict) -> str:
    """A bench_tp row's all-reduce: ``nccl`` or ``one-shot`` (the engine's option ``auto``), ``-`` for
    one GPU; rows from before the option all ran NCCL."""
    way = row.get("all_reduce", "nccl" if row.get("tp", 2) > 1 else "-")
    return "one-shot" if way == "auto" else way


def plot_tensor_parallel(result: dict, path: str) -> None:
    """Grouped bars: TPOT per (level, batch), one bar per tensor-parallel size, and the step's
    collectives alone; the weights floor of each size as dashed lines."""
    rows = [r for r in result["rows"] if "tpot_ms" in r]
    groups = sorted({(r["level"], r["batch"]) for r in rows}, key=lambda key: (-key[0], key[1]))
    series = {}
    for tp, way in sorted({(r["tp"], tp_all_reduce(r)) for r in rows}):
        series[f"TP={tp}" + (f" ({way})" if tp > 1 else "")] = [
            next((r["tpot_ms"] for r in rows if (r["level"], r["batch"], r["tp"], tp_all_reduce(r)) == (*g, tp, way)), 0)
            for g in groups]
    for way in sorted({tp_all_reduce(r) for r in result["rows"] if "collectives" in r}):
        us = {r["batch"]: r["us"] / 1e3 for r in result["rows"] if "collectives" in r and tp_all_reduce(r) == way}
        series[f"collectives alone (TP=2, {way})"] = [us.get(b, 0) for _, b in groups]
    fig, ax = _subplots(figsize=(7, 4))
    _grouped_bars(ax, [f"-O{level}, batch {b}" for level, b in groups], series)
    floor = result["weights_gb"] * 1e9 / (result["copy_bandwidth_tbs"] * 1e12) * 1e3
    for tp, style in ((1, "--"), (2, ":")):
        ax.axhline(floor / tp, color="gray", linestyle=style, label=f"weights floor TP={tp}")
    ax.set_ylabel("ms per output token")
    ax.set_title(f"{result['model']} shapes, {result['device']} x {result['gpus']}, torch {result['torch']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_persistent_mlp(result: dict, path: str) -> None:
    """tools/bench_persistent_mlp.py: microseconds an MLP block by variant, each with its HBM floor."""
    rows = [r for r in result["rows"] if "us_a_block" in r][::-1]
    fig, ax = _subplots(figsize=(9, 4.5))
    names = [r["variant"] for r in rows]
    ax.barh(names, [r["us_a_block"] for r in rows], label="measured")
    ax.scatter([r["floor_us"] for r in rows], names, color="black", marker="|", s=300, label="HBM floor of its bytes")
    ax.set_xlabel("us a block (8 blocks in one CUDA graph, L2 cleared before)")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(f"MLP block, {result['shapes']}, {result['device']}, torch {result['torch']}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def decode_history(runs: list[tuple[str, dict]]) -> dict[int, list[tuple[str, float, float | None]]]:
    """Per batch, each labelled ``tools/bench_decode.py`` run's ``full`` step as a multiple of its HBM
    floor and how many times faster it is than the same run's reduce-overhead (None where the run had
    no such row): the two ratios issue 15 sets targets on, each from one run, as its targets ask."""
    history: dict[int, list[tuple[str, float, float | None]]] = {}
    for label, result in runs:
        rows = [r for r in result["rows"] if "gpu_ms" in r]
        for full in (r for r in rows if r["mode"] == "full"):
            ro = next((r["gpu_ms"] for r in rows if r["mode"] == "reduce-overhead" and r["batch"] == full["batch"]),
                      None)
            history.setdefault(full["batch"], []).append(
                (label, full["gpu_ms"] / full["floor_ms"], ro / full["gpu_ms"] if ro else None))
    return dict(sorted(history.items()))


def plot_decode_history(runs: list[tuple[str, dict]], path: str,
                        floor_targets: dict[int, float], speedup_target: float) -> None:
    """Two panels over runs: the full graph's step against the floor, and its lead over
    reduce-overhead, one line per batch, with the targets as dashed lines of the batch's colour."""
    history = decode_history(runs)
    labels = [label for label, _ in runs]
    fig, (left, right) = _subplots(1, 2, figsize=(11, 4.2))
    for i, (batch, points) in enumerate(history.items()):
        color = f"C{i}"
        xs = [labels.index(label) for label, _, _ in points]
        left.plot(xs, [x_floor for _, x_floor, _ in points], marker="o", color=color, label=f"batch {batch}")
        led = [(labels.index(label), lead) for label, _, lead in points if lead]
        right.plot([x for x, _ in led], [lead for _, lead in led], marker="o", color=color,
                   label=f"batch {batch}")
        if batch in floor_targets:
            left.axhline(floor_targets[batch], color=color, linestyle="--", linewidth=1)
    right.axhline(speedup_target, color="black", linestyle="--", linewidth=1, label="target, every batch")
    left.set_ylabel("full graph step / HBM floor (dashed: target)")
    right.set_ylabel("reduce-overhead step / full graph step")
    for ax in (left, right):
        ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        ax.legend(fontsize=8)
    latest = runs[-1][1]
    fig.suptitle(f"{latest['model']} decode, context {latest['context']}, {latest['device']}, torch {latest['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    if sys.argv[1] == "--history":
        target, sources = sys.argv[2], sys.argv[3:]
        runs = []
        for source in sources:
            with open(source) as f:
                label = os.path.basename(source).removesuffix(".json").removeprefix("bench_decode_")
                runs.append((label, json.load(f)))
        plot_decode_history(runs, target, ISSUE_15_FLOOR_TARGETS, ISSUE_15_SPEEDUP_TARGET)
        return
    source, target = sys.argv[1:3]
    with open(source) as f:
        result = json.load(f)
    if result.get("kind") == "serving":
        plot_serving(result, target)
    elif result.get("kind") == "transformers":
        plot_transformers(result, target)
    elif result.get("kind") == "tensor_parallel":
        plot_tensor_parallel(result, target)
    elif result.get("kind") == "persistent_mlp":
        plot_persistent_mlp(result, target)
    elif "shapes" in result:  # tools/bench_attention.py
        plot_attention(result, target)
    else:
        (plot_dynamic if "modes" in result else plot_decode)(result, target)


if __name__ == "__main__":
    main()
