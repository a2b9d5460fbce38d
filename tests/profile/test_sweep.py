"""Rank sweep: one adapter per rank, a table whose numbers match the adapters on disk, extensible columns."""

from __future__ import annotations

import json
import random

import pytest

from lora_edge.core.data import DataFiles
from lora_edge.core.errors import BundleError, ConfigError
from lora_edge.core.recipe import LoraSpec, TrainSpec
from lora_edge.profile.sweep import SweepTable, check_ranks, run_sweep


@pytest.fixture(scope="module")
def sweep_dir(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    rng = random.Random(0)
    rows = [{"text": f"{rng.choice(['red', 'blue', 'green'])} thing {i}", "label": "abc"[i % 3]} for i in range(60)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = root / "sweep"
    table = run_sweep(tiny_model("bert"), DataFiles(data), out, [4, 1, 2], "seq-cls", LoraSpec(alpha=8),
                      TrainSpec(max_steps=2, batch_size=8), progress=False)
    return out, table


def test_one_adapter_per_rank_and_honest_sizes(sweep_dir):
    from safetensors.torch import load_file

    out, table = sweep_dir
    assert [row.rank for row in table.rows] == [1, 2, 4]
    for row in table.rows:
        weights_path = out / row.adapter / "adapter_model.safetensors"
        assert row.adapter_bytes == weights_path.stat().st_size
        weights = load_file(str(weights_path))
        assert row.trainable_params == sum(t.numel() for t in weights.values())
        ranks = {t.shape[0] for k, t in weights.items() if "lora_A" in k}
        assert ranks == {row.rank}
        metrics = json.loads((out / row.adapter / "metrics.json").read_text())
        assert row.validation_accuracy == metrics["validation"]["accuracy"]
        assert row.validation_macro_f1 == metrics["validation"]["macro_f1"]
    # tiny BERT: 2 layers x (query + value) x r x (32 + 32) LoRA weights, plus the 3x32+3 head
    assert [row.trainable_params for row in table.rows] == [2 * 2 * r * 64 + 99 for r in (1, 2, 4)]


def test_table_files_agree(sweep_dir):
    from matplotlib.image import imread

    out, table = sweep_dir
    record = json.loads((out / "sweep.json").read_text())
    assert [row["rank"] for row in record["rows"]] == [1, 2, 4]
    assert {c["key"] for c in record["columns"]} >= {"rank", "trainable_params", "adapter_bytes",
                                                     "validation_accuracy", "validation_macro_f1"}
    assert record["settings"]["alpha"] == 8
    markdown = (out / "sweep.md").read_text().splitlines()
    body = [line for line in markdown if line.startswith("| ") and line[2].isdigit()]
    assert [line.split("|")[1].strip() for line in body] == ["1", "2", "4"]
    assert str(table.rows[2].adapter_bytes) in body[2]
    assert imread(out / "sweep.png").shape[:2] == (400, 1000)


def test_later_stages_add_columns(sweep_dir, tmp_path):
    out, table = sweep_dir
    copy = SweepTable.load(out)
    copy.add_column("latency_ms_int8", "int8 latency ms", {1: 1.5, 4: 2.25})
    copy.save(tmp_path)
    again = SweepTable.load(tmp_path)
    assert [row.get("latency_ms_int8") for row in again.rows] == [1.5, None, 2.25]
    assert again.columns[-1] == ("latency_ms_int8", "int8 latency ms")
    assert "| int8 latency ms |" in (tmp_path / "sweep.md").read_text()
    assert again.rows[0].trainable_params == table.rows[0].trainable_params


def test_refusals(sweep_dir, tiny_model):
    out, _ = sweep_dir
    for bad in ([], [0, 2], [2, 2]):
        with pytest.raises(ConfigError, match="--ranks"):
            check_ranks(bad)
    with pytest.raises(BundleError, match="already exists"):
        run_sweep(tiny_model("bert"), DataFiles(out.parent / "data.jsonl"), out, [1], progress=False)


def test_rank_latency_exports_every_rank_once_and_keeps_them_apart(sweep_dir, tmp_path):
    """The rank axis with the real exporter: one bundle for every rank, each row from its own adapter's graphs."""
    import shutil

    from lora_edge.profile.sweep import add_sweep_latency

    out, _ = sweep_dir
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)
    table = add_sweep_latency(SweepTable.load(copy), copy, "host-cpu", seq=8, runs=6, warmup=1, quiet=True)
    rows = {row.rank: row for row in table.rows}
    assert sorted(rows) == [1, 2, 4]
    for row in rows.values():
        assert row.get("merged_p50_ms") > 0 and row.get("branched_p50_ms") > 0
    # the branches' extra FLOPs are linear in the rank: each row measured its own adapter
    flops = [rows[rank].get("extra_flops_pct") for rank in (1, 2, 4)]
    assert 0 < flops[0] < flops[1] < flops[2]
    assert flops[2] == pytest.approx(4 * flops[0], rel=1e-6)
