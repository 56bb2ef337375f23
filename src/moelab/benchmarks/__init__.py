"""`moelab bench`: MoE layers and models against their dense twins, measured as ratios in one run.

Sections (each a module): ``layer`` (MoE vs iso-active dense twin, every dispatch backend,
transformers' Mixtral block; GFLOP/s against the machine's matmul rate; memory), ``skew``
(biased router: time and drop rate as balance worsens), ``model`` (full training step tokens/s,
MoE vs dense twin). ``runner`` puts them together and ``report`` writes JSON and a markdown table.
Import the submodules directly (``from moelab.benchmarks.runner import run_bench``).
"""
