"""`moelab bench-dist` (the distributed throughput benchmark, argument parsing in cli.py) at world size 1."""

from __future__ import annotations

import json

from moelab.cli import main


def test_bench_dist_prints_one_json_line_at_world_one(capsys) -> None:
    argv = ["bench-dist", "--steps", "2", "--warmup", "1", "--global-batch", "4", "--seq", "16", "--d-model", "32",
            "--experts", "4"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip())
    assert out["world"] == 1 and out["ep"] == 1 and out["tokens_per_s"] > 0 and out["a2a_bytes_per_step"] == 0
