"""Each benchmark script runs once in its smoke mode (seconds), so none can rot.

The scripts run as subprocesses, the way users run them; tests check what they report, never how
fast anything is (speed goals live in the benchmarks themselves). Paths that need optional packages
(peft, matplotlib) are exercised when those are installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

import peftkit
from peftkit.registry import spec

ROOT = Path(__file__).resolve().parents[1]
HAS_PEFT = find_spec("peft") is not None
HAS_MATPLOTLIB = find_spec("matplotlib") is not None
VS_PEFT = ["--vs-peft"] if HAS_PEFT else []
# What a fresh interpreter registers (other tests register methods of their own in this process).
BUILTIN = [m for m in peftkit.methods() if spec(m).method_cls.__module__.startswith("peftkit.")]


def run(script: str, *args: str, timeout: float = 240) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def read(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_compare_smoke_reports_every_method_against_the_floor(tmp_path: Path) -> None:
    out = run("compare.py", "--smoke", "--device", "cpu", "--out", str(tmp_path), *VS_PEFT)
    report = read(tmp_path / "compare-cpu-smoke.json")
    rows = {r["key"]: r for r in report["rows"]}
    assert next(iter(rows)) == "floor"
    assert {f"peftkit:{m}" for m in BUILTIN} <= rows.keys()
    assert "peftkit:dora" in rows and ("peft:dora" in rows) == HAS_PEFT  # LoRA with dora=True
    assert ("torch:full" in rows) == ("full" not in BUILTIN)
    floor = rows["floor"]
    assert (
        floor["trainable"] == 0 and floor["step_vs_floor"] == 1.0 and floor["mem_vs_floor"] == 1.0
    )
    for row in rows.values():
        # Peak RSS above the built model: at smoke size a method's extra can fit in pages the
        # process already holds (0 bytes), so only the floor and full fine-tuning must show some.
        assert row["step_s"] > 0 and row["train_mem_bytes"] >= 0, row["key"]
        assert len(row["raw_step_s"]["wall"]) == len(row["raw_step_s"]["cpu"]) == report["rounds"]
    full = rows.get("peftkit:full", rows.get("torch:full"))
    assert floor["train_mem_bytes"] > 0 and full is not None and full["train_mem_bytes"] > 0
    # The smoke model: 2 layers, hidden 64, MLP 128, k/v 32 wide. LoRA r=8 on every linear layer
    # but the head: r·(in+out) per layer = 8·(128 + 96 + 96 + 128 + 192 + 192 + 192) per block.
    lora = rows["peftkit:lora"]
    assert lora["trainable"] == 2 * 8 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    assert lora["merge"] == "fully merged" and lora["infer_merged_vs_base"] > 0
    assert "| lora " in out and "step × floor" in out
    if HAS_MATPLOTLIB:
        assert (tmp_path / "compare-cpu-smoke.png").read_bytes()[:4] == b"\x89PNG"
    if HAS_PEFT:
        pair = next(p for p in report["vs_peft"] if p["method"] == "lora")
        assert pair["trainable"] == 1.0 and pair["step"] > 0
        assert rows["peft:lora"]["trainable"] == lora["trainable"]
        # peft's AdaLoRA and prefix twins pair with peftkit's methods of the same name.
        paired = {p["method"]: p for p in report["vs_peft"] if p["peftkit"] is not None}
        assert {"adalora", "prefix"} <= paired.keys()
        assert paired["adalora"]["trainable"] == 1.0
        assert rows["peft:prefix"]["config"]["prefix_projection"] is True
    # Methods that cannot merge say why and get no merged timing.
    adapter = rows["peftkit:adapter"]
    assert adapter["merge"].startswith("cannot merge") and adapter["infer_merged_vs_base"] is None
    assert rows["peftkit:prefix"]["merge"].startswith("prefix MLP folded")


def test_params_counts_match_the_lora_paper_and_closed_forms(tmp_path: Path) -> None:
    out = run("params.py", "--smoke", "--out", str(tmp_path), *VS_PEFT)
    setups = {s["setup"]: s for s in read(tmp_path / "params.json")["setups"]}
    base = setups["LoRA r=8 on W_q, W_v — RoBERTa-base"]
    large = setups["LoRA r=8 on W_q, W_v — RoBERTa-large"]
    assert base["trainable"] == base["closed_form"] == 294_912  # the paper's 0.3M
    assert large["trainable"] == large["closed_form"] == 786_432  # the paper's 0.8M
    assert base["total"] > 120e6 and large["total"] > 350e6
    for setup in setups.values():
        if setup["method"] in BUILTIN:  # every registered method is counted, and agrees
            assert setup["trainable"] == setup["closed_form"], setup
        else:
            assert setup["trainable"] is None and "closed form only" in setup["note"]
    assert setups["Houlsby adapters m=64 — BERT-base"]["trainable"] == 2_379_264
    assert setups["Prefix length 10 — GPT-2 medium"]["trainable"] == 491_520
    if HAS_PEFT:
        assert base["peft"] == 294_912
    assert "RoBERTa-large" in out


def test_inject_smoke_times_every_method(tmp_path: Path) -> None:
    run("inject.py", "--smoke", "--out", str(tmp_path), *VS_PEFT)
    report = read(tmp_path / "inject-smoke.json")
    assert {f"peftkit {m}" for m in BUILTIN} <= report["times_s"].keys() | report["failed"].keys()
    assert "peftkit lora" in report["times_s"]
    if HAS_PEFT:
        assert any(r["peftkit"] == "lora" for r in report["ratios"])


SENTENCES = [
    ("a warm and funny film", 1),
    ("a lovely , moving story", 1),
    ("the best film of the year", 1),
    ("a dull and tedious mess", 0),
    ("the worst film of the year", 0),
    ("boring , flat and far too long", 0),
]


def tiny_bert_dir(path: Path) -> Path:
    """A two-layer random BERT with a word vocabulary of SENTENCES, saved like a hub model."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = sorted({w for s, _ in SENTENCES for w in s.split()})
    path.mkdir()
    (path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])
    )
    tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sst2_like_dir(path: Path) -> Path:
    """A directory in SST-2's layout (train.tsv, dev.tsv) holding the test sentences."""
    path.mkdir()
    rows = "".join(f"{s}\t{y}\n" for s, y in SENTENCES)
    (path / "train.tsv").write_text("sentence\tlabel\n" + rows * 4)
    (path / "dev.tsv").write_text("sentence\tlabel\n" + rows)
    return path


def test_quality_smoke_trains_and_scores_every_method(tmp_path: Path) -> None:
    data = sst2_like_dir(tmp_path / "sst2")
    model = tiny_bert_dir(tmp_path / "bert")
    args = ["--smoke", "--data", str(data), "--model", str(model), "--out", str(tmp_path)]
    run("quality.py", *args, *VS_PEFT)
    results = read(tmp_path / "quality-smoke.json")["results"]
    assert set(BUILTIN) <= results.keys()
    for result in results.values():
        assert 0.0 <= result["dev_accuracy"] <= 1.0 and result["trainable"] > 0
    if HAS_PEFT:
        assert results["peft lora"]["trainable"] == results["lora"]["trainable"]


def test_quality_runs_split_by_seed_pool_into_the_same_table(tmp_path: Path) -> None:
    # Seed s fixes the head, the method's init and the batch order: seed 1 run alone equals seed 1
    # of a two-seed run, and --combine pools separate runs into one row per label.
    data = sst2_like_dir(tmp_path / "sst2")
    model = tiny_bert_dir(tmp_path / "bert")
    common = ["--smoke", "--data", str(data), "--model", str(model), "--methods", "lora"]
    run("quality.py", *common, "--seeds", "2", "--out", str(tmp_path / "both"))
    run("quality.py", *common, "--seed", "1", "--out", str(tmp_path / "one"))
    run("quality.py", *common, "--set", "lora.r=2", "--out", str(tmp_path / "r2"))
    both = read(tmp_path / "both" / "quality-smoke.json")["results"]["lora"]["per_seed"]
    one = read(tmp_path / "one" / "quality-smoke.json")["results"]["lora"]["per_seed"]
    assert [r["seed"] for r in both] == [0, 1] and [r["seed"] for r in one] == [1]
    for key in ("loss_end", "dev_accuracy"):
        assert one[0][key] == both[1][key]

    seed0 = read(tmp_path / "both" / "quality-smoke.json")
    seed0["results"]["lora"]["per_seed"] = both[:1]
    (tmp_path / "seed0.json").write_text(json.dumps(seed0))
    files = [tmp_path / "seed0.json", tmp_path / "one" / "quality-smoke.json"]
    files.append(tmp_path / "r2" / "quality-smoke.json")
    out = run("quality.py", "--combine", *map(str, files), "--out", str(tmp_path / "pooled"))
    pooled = read(tmp_path / "pooled" / "quality.json")["results"]
    assert set(pooled) == {"lora", "lora (r=2)"} and "lora (r=2)" in out
    assert pooled["lora"]["seeds"] == [0, 1]
    assert pooled["lora"]["dev_accuracies"] == [both[0]["dev_accuracy"], one[0]["dev_accuracy"]]

    twice = [str(tmp_path / "one" / "quality-smoke.json")] * 2
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--combine", *twice],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "seed 1 appears twice" in done.stderr


def test_quality_names_missing_data_files(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "quality.py"),
            "--smoke",
            "--data",
            str(tmp_path),
            "--model",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "train.tsv" in done.stderr


def test_trainer_overhead_smoke_compares_the_two_steps() -> None:
    out = run("trainer_overhead.py", "--smoke")
    assert "hand-written step" in out and "Trainer step" in out and "ratio" in out


def test_augment_smoke_measures_the_overhead_and_runs_the_study(tmp_path: Path) -> None:
    data = sst2_like_dir(tmp_path / "sst2")
    model = tiny_bert_dir(tmp_path / "bert")
    out = run("augment.py", "--smoke", "--study", "--data", str(data), "--model", str(model))
    assert "augment adds" in out and "ms per sentence" in out
    for setting in ("none", "all four", "swap", "delete", "insert", "replace"):
        assert f"| {setting}" in out


@pytest.mark.slow
def test_qlora_smoke_reports_the_4bit_base_against_full_precision(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    out = run("qlora.py", "--smoke", "--out", str(tmp_path / "qlora.json"))
    report = read(tmp_path / "qlora.json")
    rows = report["contestants"]
    expected = {"lora-full-precision", "lora-4bit"} | ({"peft-lora-4bit"} if HAS_PEFT else set())
    assert set(rows) == expected
    assert rows["lora-full-precision"]["step_ratio"] == 1.0
    assert all(r["step_s"] > 0 and r["peak_mib"] > 0 for r in rows.values())
    assert report["mfu_convention"].startswith("4·N") and "lora-4bit" in out


def test_mfu_counts_four_flops_per_frozen_parameter_and_six_per_trained() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from compare_report import mfu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = [
        {"trainable": 0, "train_tokens_per_s": 1.0},
        {"trainable": 10, "train_tokens_per_s": 1.0},
        {"trainable": 100, "train_tokens_per_s": 1.0},
    ]
    mfu(rows, 100, peak=1.0)
    assert [r["mfu"] for r in rows] == [400.0, 4 * 90 + 6 * 10, 600.0]


@pytest.mark.slow  # launches torchrun twice (one and two processes): ~50 s each engine
@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_fsdp_memory_halves_each_rank_share_with_two_processes(engine: str) -> None:
    if engine == "deepspeed" and find_spec("deepspeed") is None:
        pytest.skip('DeepSpeed is not installed (pip install "peftkit[deepspeed]")')
    out = run("fsdp_memory.py", "--smoke", "--engine", engine, timeout=400)
    rows = json.loads(out.split("JSON ", 1)[1])
    one, two = rows["1"], rows["2"]
    for kind in ("base", "adapter", "optimizer"):
        assert two[kind] == pytest.approx(one[kind] / 2, rel=0.02), kind
    assert one["optimizer"] >= 2 * one["adapter"]  # AdamW: two moments per adapter parameter
