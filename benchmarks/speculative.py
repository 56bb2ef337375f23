"""Benchmark: speculative decoding against plain greedy decoding on a trained checkpoint (not a test).

Prompts are the openings of held-out documents of ../shared/corpus, two kinds: code (Python, Go) and
prose (documentation and manual pages). Per prompt, arms interleaved in every round (the order
rotating): ``plain`` (:func:`moelab.infer.generate.generate`, the model's forward with a KV cache:
the same forward speculation verifies with), ``lookup`` (prompt lookup draft) and, with
``--draft-ckpt``, ``model`` (that checkpoint drafting, e.g. the MoE's dense twin), each with
``--draft-tokens`` k, and ``none`` (speculation's own loop with a draft that proposes nothing: one
token a pass, the baseline that isolates what a draft buys from what the leaner loop does).
Reported per kind: tok/s and its ratios to ``plain`` and to ``none`` (medians over rounds of the
per-round ratios), the acceptance rate, tokens per pass of the model; and whether every output
equals plain decoding's token for token. The machine's read bandwidth is measured beside them.

    python benchmarks/speculative.py --ckpt runs/studies/placement/all/seed0 \\
        --draft-ckpt runs/studies/data-hunger/dense/seed0 --out benchmarks/results/speculative.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

import torch

from moelab.convert.load import load_model
from moelab.hardware import measure_read_bandwidth
from moelab.infer.generate import SamplingParams, generate
from moelab.infer.speculative import ModelDraft, PromptLookupDraft, speculative_generate
from moelab.outputs import atomic_write_text

CORPUS = next(
    (p / "shared" / "corpus" for p in Path(__file__).resolve().parents if (p / "shared" / "corpus").is_dir()),
    Path("../shared/corpus"),
)
KINDS = {"code": ("python", "go"), "prose": ("en",)}


def prompts_by_kind(tok, per_kind: int, prompt_tokens: int) -> dict[str, list[list[int]]]:
    """The first ``prompt_tokens`` tokens of the first ``per_kind`` long-enough held-out documents of each kind."""
    out: dict[str, list[list[int]]] = {k: [] for k in KINDS}
    with gzip.open(CORPUS / "valid.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            kind = "code" if doc["domain"] == "code" else "prose" if doc["lang"] in KINDS["prose"] else None
            if kind is None or len(out[kind]) >= per_kind:
                continue
            ids = tok.encode(doc["text"])
            if len(ids) >= prompt_tokens:
                out[kind].append(ids[:prompt_tokens])
    return out


class NoDraft:
    """Proposes nothing: speculation's own loop at one token per pass, the baseline that isolates a draft's gain."""

    def propose(self, context, k: int) -> list[int]:
        return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="the model to decode (run or checkpoint folder)")
    ap.add_argument("--draft-ckpt", help="a draft model with the same tokenizer (e.g. the dense twin)")
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per kind (code, prose)")
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/speculative.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_model(args.ckpt)
    model.eval()
    drafts = {"none": NoDraft, "lookup": PromptLookupDraft}
    if args.draft_ckpt:
        draft_model, _ = load_model(args.draft_ckpt)
        drafts["model"] = lambda: ModelDraft(draft_model)
    params = SamplingParams(max_new_tokens=args.max_tokens, stop_at_eos=False)
    prompts = prompts_by_kind(tok, args.prompts, min(args.prompt_tokens, model.cfg.max_seq_len - args.max_tokens))
    arms = ["plain", *drafts]

    # untimed pass: outputs checked against plain decoding (and warm-up); draft statistics are deterministic
    same = True
    stats_by: dict[str, dict[str, dict[str, float]]] = {k: {} for k in prompts}
    for kind, kind_prompts in prompts.items():
        for arm, make in drafts.items():
            drafted = accepted = passes = tokens = 0
            for p in kind_prompts:
                out, st = speculative_generate(model, p, make(), params, args.draft_tokens)
                same &= out.token_ids == generate(model, [p], params)[0].token_ids
                drafted, accepted = drafted + st.drafted, accepted + st.accepted
                passes, tokens = passes + st.passes, tokens + st.tokens
            stats_by[kind][arm] = {"acceptance_rate": accepted / max(drafted, 1), "tokens_per_pass": tokens / max(passes, 1)}

    def decode_all(arm: str, kind_prompts: list[list[int]]) -> float:
        """tok/s of one arm over the prompts of one kind."""
        tokens, t0 = 0, time.perf_counter()
        for p in kind_prompts:
            if arm == "plain":
                tokens += len(generate(model, [p], params)[0].token_ids)
            else:
                tokens += len(speculative_generate(model, p, drafts[arm](), params, args.draft_tokens)[0].token_ids)
        return tokens / (time.perf_counter() - t0)

    bandwidth = [measure_read_bandwidth(0.5, 7, statistic="median", dtype=torch.float32)]
    tok_s: dict[str, dict[str, list[float]]] = {k: {a: [] for a in arms} for k in prompts}
    for r in range(args.rounds):
        order = arms[r % len(arms) :] + arms[: r % len(arms)]
        for kind, kind_prompts in prompts.items():
            for arm in order:
                tok_s[kind][arm].append(decode_all(arm, kind_prompts))
        bandwidth.append(measure_read_bandwidth(0.5, 7, statistic="median", dtype=torch.float32))

    result: dict = {
        "ckpt": args.ckpt, "draft_ckpt": args.draft_ckpt, "draft_tokens": args.draft_tokens,
        "prompts_per_kind": {k: len(v) for k, v in prompts.items()}, "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens, "rounds": args.rounds, "threads": args.threads,
        "read_bandwidth_gbs": bandwidth, "outputs_equal_plain": same, "kinds": {},
    }  # fmt: skip
    for kind, per_arm in tok_s.items():
        plain = per_arm["plain"]
        res: dict = {"plain_tok_s": statistics.median(plain)}
        for arm in drafts:
            res[arm] = {
                "tok_s": statistics.median(per_arm[arm]),
                "ratio_to_plain": statistics.median(a / b for a, b in zip(per_arm[arm], plain)),
                "ratio_to_none": statistics.median(a / b for a, b in zip(per_arm[arm], per_arm["none"])),
                **stats_by[kind][arm],
            }
        result["kinds"][kind] = res
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(json.dumps(result["kinds"], indent=2), f"\noutputs equal plain: {same}")


if __name__ == "__main__":
    main()
