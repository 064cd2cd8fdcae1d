"""Turning compare.py's measurements into rows, ratios, goals, tables and a plot."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import common
from common import fmt_int, fmt_ratio, mib
from contestants import FLOOR, Contestant

# Goals from the benchmark issue: step time as a multiple of the floor, per method.
STEP_GOALS = {"lora": 1.03, "adapter": 1.03, "prefix": 1.03, "adalora": 1.10}
MEMORY_GOAL = 1.03  # training memory above the model, as a multiple of the floor's
MERGED_GOAL = 1.01  # merged inference time, as a multiple of the base model's

Clocks = dict[str, dict[str, list[float]]]  # clock ("wall", "cpu") -> task -> seconds per round


# -- results ---------------------------------------------------------------------------------------
def assemble(
    line: list[Contestant],
    info: dict[str, Any],
    clocks: tuple[Clocks, Clocks],
    memory: dict[str, dict[str, Any]],
    notes: dict[str, str],
    tokens: int,
    clock: str,
) -> list[dict[str, Any]]:
    """One row per contestant; time figures from ``clock``, raw times of both clocks kept."""
    (train_clocks, infer_clocks), rows = clocks, []
    train, infer = train_clocks[clock], infer_clocks[clock]
    floor_mem = memory.get(FLOOR, {}).get("train_bytes")
    for c in line:
        step = statistics.median(train[c.key])
        mem = memory.get(c.key, {}).get("train_bytes")
        row = {
            "key": c.key,
            "label": c.label,
            "family": c.family,
            "method": c.method,
            **info[c.key],
            "step_s": step,
            "train_tokens_per_s": tokens / step,
            "step_vs_floor": common.median_ratio(train[c.key], train[FLOOR]),
            "train_mem_bytes": mem,
            "mem_vs_floor": mem / floor_mem if mem is not None and floor_mem else None,
            "merge": notes.get(c.key),
            "raw_step_s": {k: v[c.key] for k, v in train_clocks.items()},
        }
        for kind in ("unmerged", "merged"):
            task = f"{c.key}|{kind}"
            times = infer.get(task)
            row[f"infer_{kind}_tokens_per_s"] = tokens / statistics.median(times) if times else None
            row[f"infer_{kind}_vs_base"] = (
                common.median_ratio(times, infer["base"]) if times else None
            )
            row[f"raw_infer_{kind}_s"] = {k: v[task] for k, v in infer_clocks.items() if task in v}
        rows.append(row)
    return rows


def peft_pairs(rows: list[dict[str, Any]], train: dict[str, list[float]]) -> list[dict[str, Any]]:
    """peftkit / peft ratios for every method both run (time: median of per-round ratios)."""
    ours = {r["method"]: r for r in rows if r["family"] == "peftkit"}
    pairs: list[dict[str, Any]] = []
    for theirs in (r for r in rows if r["family"] == "peft"):
        mine = ours.get(theirs["method"])
        if mine is None:
            pairs.append({"method": theirs["method"], "peftkit": None})
            continue
        pairs.append(
            {
                "method": theirs["method"],
                "peftkit": mine["key"],
                "peft": theirs["key"],
                "step": common.median_ratio(train[mine["key"]], train[theirs["key"]]),
                "memory": _ratio(mine["train_mem_bytes"], theirs["train_mem_bytes"]),
                "infer_unmerged": _ratio(
                    theirs["infer_unmerged_tokens_per_s"], mine["infer_unmerged_tokens_per_s"]
                ),
                "trainable": _ratio(mine["trainable"], theirs["trainable"]),
            }
        )
    return pairs


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def goals(rows: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """(goal, measured, met) for each goal that applies to what ran."""
    out = []
    for r in (r for r in rows if r["family"] == "peftkit" and r["method"] in STEP_GOALS):
        limit = STEP_GOALS[r["method"]]
        out.append(
            (
                f"{r['label']} step ≤ {limit}× floor",
                fmt_ratio(r["step_vs_floor"]),
                r["step_vs_floor"] <= limit,
            )
        )
        if r["mem_vs_floor"] is not None:
            met = r["mem_vs_floor"] <= MEMORY_GOAL
            out.append(
                (f"{r['label']} memory ≤ {MEMORY_GOAL}× floor", fmt_ratio(r["mem_vs_floor"]), met)
            )
        if r["merge"] == "fully merged" and r["infer_merged_vs_base"] is not None:
            met = r["infer_merged_vs_base"] <= MERGED_GOAL
            out.append(
                (
                    f"{r['label']} merged inference ≤ {MERGED_GOAL}× base",
                    fmt_ratio(r["infer_merged_vs_base"]),
                    met,
                )
            )
    for p in pairs:
        if p.get("step") is not None:
            out.append((f"{p['method']} step ≤ peft's", fmt_ratio(p["step"]), p["step"] <= 1.0))
    return out


# -- output ----------------------------------------------------------------------------------------
def main_table(rows: list[dict[str, Any]], cuda: bool, peak_flops: float | None) -> str:
    header = ["method", "trainable", "% of total", "step ms", "train tok/s", "step × floor"]
    header += ["train mem MiB", "mem × floor", "infer tok/s", "× base", "merged tok/s", "× base"]
    header += [f"MFU ({MFU_CONVENTION})"] if cuda and peak_flops else []
    body = []
    for r in rows:
        mem = r["train_mem_bytes"]
        line = [
            r["label"],
            fmt_int(r["trainable"]),
            f"{r['percent']:.3f}%",
            f"{1000 * r['step_s']:.1f}",
            f"{r['train_tokens_per_s']:,.0f}",
            fmt_ratio(r["step_vs_floor"]),
            "–" if mem is None else f"{mib(mem):,.1f}",
            fmt_ratio(r["mem_vs_floor"]),
            _tok(r["infer_unmerged_tokens_per_s"]),
            fmt_ratio(r["infer_unmerged_vs_base"]),
            _tok(r["infer_merged_tokens_per_s"]),
            fmt_ratio(r["infer_merged_vs_base"]),
        ]
        if cuda and peak_flops:
            line.append(f"{100 * r['mfu']:.1f}%")
        body.append(line)
    return common.markdown_table(header, body)


def _tok(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def peft_table(pairs: list[dict[str, Any]]) -> str:
    header = ["method", "step time", "train memory", "infer time (unmerged)", "trainable"]
    body = []
    for p in pairs:
        if p["peftkit"] is None:
            body.append([p["method"], "peft only: not registered in peftkit", "", "", ""])
            continue
        cells = [p["step"], p["memory"], p["infer_unmerged"], p["trainable"]]
        body.append([p["method"], *(fmt_ratio(v) for v in cells)])
    return common.markdown_table(header, body)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Step time and training memory per method, as horizontal bars; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [r["label"] for r in rows][::-1]
    colors = {"floor": "#888888", "peftkit": "#1f77b4", "torch": "#9467bd", "peft": "#ff7f0e"}
    shades = [colors[r["family"]] for r in rows][::-1]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.6), sharey=True)
    ax1.barh(labels, [1000 * r["step_s"] for r in rows][::-1], color=shades)
    ax1.set_xlabel("training step (ms, median)")
    mems = [mib(r["train_mem_bytes"] or 0) for r in rows][::-1]
    ax2.barh(labels, mems, color=shades)
    ax2.set_xlabel("peak training memory above the model (MiB)")
    for ax, key in ((ax1, "step_vs_floor"), (ax2, "mem_vs_floor")):
        for i, r in enumerate(rows[::-1]):
            if r[key] is not None:
                ax.annotate(
                    f" {r[key]:.2f}×", (ax.patches[i].get_width(), i), va="center", fontsize=8
                )
        ax.margins(x=0.18)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


MFU_CONVENTION = "4·N_frozen + 6·N_trainable FLOPs per token"


def mfu(rows: list[dict[str, Any]], template_params: int, peak: float | None) -> None:
    """Model FLOPs utilisation counting what a step computes: a frozen parameter costs 4 FLOPs per
    token (forward, and the input gradient the backward still needs), a trained one 6 (its weight
    gradient too). Full fine-tuning is then the PaLM 6·N; a frozen base with an adapter about 4·N,
    not 6·N, which would credit it with weight gradients it never computes."""
    for r in rows:
        trained = min(int(r.get("trainable") or 0), template_params)
        flops = 4 * (template_params - trained) + 6 * int(r.get("trainable") or 0)
        r["mfu"] = flops * r["train_tokens_per_s"] / peak if peak else None


def print_report(report: dict[str, Any], cuda: bool, peak: float | None) -> None:
    env = report["environment"]
    print(f"\n{env['cpu']}, {env['threads']} threads; torch {env['torch']}; device {env['device']}")
    clock = "wall time" if report["clock"] == "wall" else "process CPU time"
    print(
        f"{clock}: medians of {report['rounds']} interleaved rounds after {report['warmup']} "
        "warm-up; ratios are medians of per-round ratios\n"
    )
    print(main_table(report["rows"], cuda, peak))
    if report["vs_peft"]:
        print("\npeftkit / peft (below 1: peftkit is faster or smaller)\n")
        print(peft_table(report["vs_peft"]))
    if report["goals"]:
        print("\ngoals\n")
        rows = [
            [g["goal"], g["measured"], "met" if g["met"] else "NOT MET"] for g in report["goals"]
        ]
        print(common.markdown_table(["goal", "measured", ""], rows))
