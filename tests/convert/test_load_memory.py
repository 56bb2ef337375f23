"""Loading at the size of the weights (issue 26): a ~200M-parameter bf16 Mixtral written by transformers in
shards is loaded, and converted, in a subprocess; its peak RSS above the interpreter with torch imported
stays within 1.25 × the weights' bytes + 300 MB (the eager fp32 path needed about 12 bytes a parameter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

SRC = Path(__file__).resolve().parents[2] / "src"
FIXED = 300 * 2**20

# Runs in a fresh interpreter: baseline = peak RSS with torch imported, before any moelab module. The peak is
# VmHWM (this process's high-water RSS): getrusage's ru_maxrss keeps the forking parent's peak across exec.
MEASURE = """
import json, sys
import torch
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
base = hwm()
what, src, dst = sys.argv[1], sys.argv[2], sys.argv[3]
if what == "load":
    from moelab.convert.load import load_checkpoint_model
    model, _ = load_checkpoint_model(src, dtype="bf16")
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
else:
    from moelab.cli import main
    assert main(["convert", src, dst, "--dtype", "bf16"]) == 0
    dtypes = []
peak = hwm()
print(json.dumps({"base": base, "peak": peak, "dtypes": dtypes}))
"""


def _mixtral_200m(folder: Path) -> int:
    """A random ~213M-parameter Mixtral (4 experts) saved in bf16 shards of 100 MB; returns the weights' bytes."""
    cfg = transformers.MixtralConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=1792, num_hidden_layers=6, num_attention_heads=16,
        num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="100MB")
    del model
    assert (folder / "model.safetensors.index.json").is_file()
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _measure(what: str, src: Path, dst: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", MEASURE, what, str(src), str(dst)], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from /proc (Linux)")
def test_streamed_load_and_convert_peak_rss_stay_near_the_weights(tmp_path) -> None:
    weights = _mixtral_200m(tmp_path / "hf")
    assert 380 * 2**20 < weights < 480 * 2**20
    bound = 1.25 * weights + FIXED
    load = _measure("load", tmp_path / "hf", tmp_path / "unused")
    assert load["dtypes"] == ["torch.bfloat16", "torch.float32"]  # fp32: the four tiny router gates
    convert = _measure("convert", tmp_path / "hf", tmp_path / "ml")
    assert (tmp_path / "ml" / "model.safetensors").stat().st_size < 1.01 * weights  # bf16 out, not fp32
    for what, r in (("load", load), ("convert", convert)):
        used = r["peak"] - r["base"]
        print(f"{what}: peak RSS above torch {used / 2**20:.0f} MiB for {weights / 2**20:.0f} MiB of weights "
              f"(bound {bound / 2**20:.0f} MiB)")  # fmt: skip
        assert used <= bound, (what, used, bound)
