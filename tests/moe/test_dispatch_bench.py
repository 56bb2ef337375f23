"""`moelab bench` machinery on tiny shapes: it runs every section and reports what it measured.

No wall-time assertions: only that the records hold the candidates, ratios and targets.
"""

from __future__ import annotations

import json

import pytest
import torch

from moelab.benchmarks.layer import LayerShape, bench_layer
from moelab.benchmarks.model import bench_model
from moelab.benchmarks.report import to_markdown
from moelab.benchmarks.skew import bench_skew, biased_decision
from moelab.benchmarks.timing import interleaved, saved_for_backward_bytes
from moelab.cli import main
from moelab.moe.dispatch import DISPATCHERS

CPU = torch.device("cpu")
TINY = LayerShape(num_experts=4, top_k=2, expert_hidden=16, d_model=32, tokens=24)


def test_layer_bench_covers_every_backend_and_transformers() -> None:
    rec = bench_layer(TINY, torch.float32, CPU, list(DISPATCHERS), repeats=1)
    assert rec["errors"] == {}
    assert set(rec["rows"]) == {"dense", "hf:eager", "hf:grouped_mm"} | {f"moe:{b}" for b in DISPATCHERS}
    assert rec["rows"]["dense"]["fwdbwd_vs_dense"] == 1.0
    for row in rec["rows"].values():
        assert row["fwdbwd_s"] > 0 and row["fwd_s"] > 0 and row["saved_for_backward_MB"] > 0


def test_transformers_block_gets_the_same_weights_and_output() -> None:
    """Same weights → the Mixtral block (renormalised top-k) computes what moelab's layer does."""
    from moelab.benchmarks.hf_mixtral import mixtral_block_like
    from moelab.benchmarks.layer import layer_candidates

    cands = layer_candidates(TINY, torch.float32, CPU, ["sorted"], hf=True)
    x = torch.randn(1, TINY.tokens, TINY.d_model)
    want = cands["moe:sorted"][0](x)
    for impl in ("eager", "grouped_mm"):
        got = cands[f"hf:{impl}"][0](x).reshape(-1, TINY.d_model)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert mixtral_block_like(cands["moe:sorted"][1], "eager", torch.float32) is not None


def test_saved_memory_excludes_parameters_and_counts_activations() -> None:
    w = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(8, 64, requires_grad=True)
    assert saved_for_backward_bytes(lambda: (x @ w).sum(), [w]) == x.numel() * 4


def test_skew_raises_load_imbalance_and_drops() -> None:
    gate = torch.randn(8, 32) * 32**-0.5
    x = torch.randn(256, 32)
    loads = [biased_decision(x, gate, s, 2).tokens_per_expert().float() for s in (0.0, 4.0)]
    assert loads[1].max() / loads[1].mean() > loads[0].max() / loads[0].mean()
    rows = bench_skew(TINY, torch.float32, CPU, [0.0, 4.0], ["sorted"], repeats=1)
    assert rows[1]["drop_rate_cf1.25"] > rows[0]["drop_rate_cf1.25"]
    assert set(rows[0]["fwdbwd_s"]) == {"sorted", "sorted@cf1.25"}


def test_interleaved_runs_each_candidate_every_round() -> None:
    calls = {"a": 0, "b": 0}
    interleaved({n: (lambda n=n: calls.__setitem__(n, calls[n] + 1)) for n in calls}, repeats=3, warmup=1)
    assert calls == {"a": 4, "b": 4}


@pytest.mark.slow
def test_model_step_reports_both_twins() -> None:
    rec = bench_model("smoke", batch=1, seq=16, dtype=torch.float32, device=CPU, repeats=1)
    assert set(rec["tokens_per_s"]) == {"moe", "dense"}
    assert rec["active_params"]["moe"] > rec["active_params"]["dense"]  # the router's weights


def test_report_lists_targets() -> None:
    rec = bench_layer(LayerShape(8, 2, 1024, 32, 16), torch.float32, CPU, ["auto"], repeats=1, hf=False)
    md = to_markdown(
        {
            "date": "d",
            "machine": {"device": "cpu", "torch": "t", "threads": 1},
            "matmul_gflops": {"fp32": 1.0},
            "layer": [rec],
        }
    )
    assert "E8k2/h1024 float32 MoE/dense | ≤ 1.05" in md


def test_cli_bench_rejects_unknown_backend(capsys) -> None:
    assert main(["bench", "--backend", "nope"]) == 2
    assert "unknown dispatch backend 'nope'" in capsys.readouterr().err


def test_cli_bench_writes_json_and_markdown(tmp_path, monkeypatch) -> None:
    import moelab.benchmarks.runner as runner

    monkeypatch.setattr(runner, "ISSUE_SHAPES", ((4, 2, 16),))
    code = main(
        [
            "bench",
            "--quick",
            "--tokens",
            "16",
            "--repeats",
            "1",
            "--dtype",
            "fp32",
            "--no-model",
            "--no-hf",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    [js] = tmp_path.glob("quick-*.json")
    data = json.loads(js.read_text())
    assert {r["name"] for r in data["layer"]} == {"E4k2/h16"}
    assert list(tmp_path.glob("quick-*.md"))


def test_cli_bench_runs_only_the_requested_transformers_implementation(tmp_path, monkeypatch) -> None:
    import moelab.benchmarks.runner as runner

    monkeypatch.setattr(runner, "ISSUE_SHAPES", ((4, 2, 16),))
    args = ["bench", "--quick", "--tokens", "16", "--repeats", "1", "--dtype", "fp32", "--no-model"]
    assert main([*args, "--backend", "sorted", "--hf-impl", "grouped_mm", "--out", str(tmp_path)]) == 0
    [js] = tmp_path.glob("quick-*.json")
    assert set(json.loads(js.read_text())["layer"][0]["rows"]) == {"dense", "moe:sorted", "hf:grouped_mm"}
