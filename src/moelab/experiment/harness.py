"""Downstream tasks through lm-evaluation-harness (the ``lm-eval`` package).

Why the harness rather than our own task code: its task definitions (prompts, few-shot
sampling, answer normalisation, metrics) are what papers report, so a moelab score is
comparable with a published one only when the same code produced it.

:class:`MoelabLM` is a harness model backed by any folder moelab loads (a run folder, a
checkpoint, a moelab or Hugging Face model folder). It answers the three request kinds:

- ``loglikelihood``: log P(continuation | context) summed over the continuation's tokens, and
  whether greedy decoding would have produced it. Requests are scored in batches of right-padded
  rows, longest first; padding sits after every real token, so a causal model's real positions see
  exactly what they would alone. A prefix-LM scores with the context as its bidirectional prefix.
- ``loglikelihood_rolling``: a whole document's log-likelihood over disjoint windows of the
  model's context (perplexity tasks).
- ``generate_until``: greedy or sampled text through :func:`moelab.infer.generate.generate`, cut
  at the task's stop strings.

Two ways in: ``moelab eval CKPT --tasks a,b [--include-path DIR]`` (:func:`evaluate_tasks`), and
``python -m moelab.experiment.harness --model moelab --model_args path=DIR ...``, which is the
harness's own command line with ``moelab`` registered (the harness has no plugin entry point, so a
bare ``lm_eval --model moelab`` cannot see a model class it never imported).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moelab.errors import UserError

MODEL_NAME = "moelab"


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise UserError(
            "downstream tasks need lm-evaluation-harness: pip install lm-eval (it is part of moelab's dev extra)"
        ) from None
    return lm_eval


def _batches(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield list(order[start : start + size])


class _Scorer:
    """Token-level scoring of one loaded model; no harness types, so it is testable on its own."""

    def __init__(self, model: torch.nn.Module, max_length: int, batch_size: int) -> None:
        cfg = model.cfg
        if cfg.attention not in ("causal", "prefix"):
            raise UserError(
                f"downstream tasks score continuations left to right; this model has attention={cfg.attention!r} "
                "(an encoder). Evaluate a causal or prefix-LM checkpoint."
            )
        self.model, self.prefix_lm = model, cfg.attention == "prefix"
        self.max_length, self.batch_size = max_length, max(1, batch_size)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``(context ids, continuation ids)`` → ``(sum log P(continuation), greedy?)`` per pair.

        The window is the last ``max_length + 1`` tokens of context + continuation (the last
        token is only a target); a continuation longer than the window is scored on the part
        that fits, as the harness's own models do.
        """
        rows = []
        for context, continuation in pairs:
            if not continuation:
                raise UserError("a loglikelihood request has an empty continuation: nothing to score")
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            n_cont = min(len(continuation), len(whole) - 1)
            rows.append((whole[:-1], whole[-n_cont:], len(whole) - 1 - n_cont))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for batch in _batches(order, self.batch_size):
            length = len(rows[batch[0]][0])
            ids = torch.zeros(len(batch), length, dtype=torch.long)
            mask = torch.zeros(len(batch), length, dtype=torch.long)
            for r, i in enumerate(batch):
                inputs = rows[i][0]
                ids[r, : len(inputs)] = torch.as_tensor(inputs)
                mask[r, : len(inputs)] = 1
            kwargs: dict[str, Any] = {"attention_mask": mask.to(self.device)}
            if self.prefix_lm:
                # the context fills positions 0..start; the continuation's tokens stay causal
                kwargs["prefix_len"] = torch.as_tensor([rows[i][2] + 1 for i in batch], device=self.device)
            logits = self.model(ids.to(self.device), **kwargs).logits.float()
            logprobs = F.log_softmax(logits, dim=-1)
            for r, i in enumerate(batch):
                inputs, targets, start = rows[i]
                span = logprobs[r, start : start + len(targets)]  # position p predicts token p + 1
                target = torch.as_tensor(targets, device=span.device)
                total = span.gather(-1, target[:, None]).sum().item()
                results[i] = (total, bool((span.argmax(-1) == target).all()))
        return results


def _harness_model_class():
    """The harness model class, defined once lm-eval is importable and registered as ``moelab``."""
    _require_lm_eval()
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry, register_model

    if MODEL_NAME in model_registry and isinstance(model_registry.get(MODEL_NAME), type):
        return model_registry.get(MODEL_NAME)

    class MoelabLM(TemplateLM):
        """A moelab checkpoint as a harness model.

        ``--model_args``: ``path`` (required), ``device`` (cpu), ``batch_size`` (8),
        ``max_length`` (the model's context), ``dtype`` (bf16 | fp16 | fp32, or their torch names;
        default: the stored weights', loaded streamed at that size).
        """

        def __init__(self, path: str, device: str = "cpu", batch_size: int | str = 8,
                     max_length: int | None = None, dtype: str | None = None, **_: Any) -> None:  # fmt: skip
            super().__init__()
            from moelab.convert.load import load_model

            if str(device).startswith("cuda") and not torch.cuda.is_available():
                # the harness's command line defaults to cuda; its own HF model falls back the same way
                warnings.warn(f"device {device!r} is not available here: running on cpu", stacklevel=2)
                device = "cpu"
            aliases = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "auto": None}
            model, tokenizer = load_model(path, device=device, dtype=aliases.get(dtype, dtype))  # streamed
            context = int(max_length or model.cfg.max_seq_len)
            if not 1 <= context <= model.cfg.max_seq_len:
                raise UserError(f"max_length={context} must be in [1, {model.cfg.max_seq_len}] (the model's context)")
            size = 8 if str(batch_size).startswith("auto") else int(batch_size)
            self.model, self.tokenizer, self.path = model, tokenizer, str(path)
            self.scorer = _Scorer(model, context, size)
            self._max_length = context

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            from lm_eval.utils import simple_parse_args_string

            args = simple_parse_args_string(arg_string)
            extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
            return cls(**args, **extra)

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_id

        @property
        def prefix_token_id(self) -> int:
            return self.tokenizer.bos_id

        @property
        def max_length(self) -> int:
            return self._max_length

        @property
        def tokenizer_name(self) -> str:
            return f"moelab:{self.path}"

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            return list(self.tokenizer.encode(string))

        def tok_decode(self, ids: Sequence[int]) -> str:
            return self.tokenizer.decode(ids)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any):
            scores = self.scorer.score([(ctx, cont) for _, ctx, cont in requests])
            for (key, _, _), result in zip(requests, scores):
                self.cache_hook.add_partial("loglikelihood", key, result)
            return scores

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            out = []
            for (text,) in (req.args for req in requests):
                windows = [
                    make_disjoint_window(w)
                    for w in get_rolling_token_windows(
                        self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1
                    )
                ]
                total = sum(s for s, _ in self.scorer.score(windows))
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
                out.append(total)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            from moelab.infer.generate import SamplingParams, generate

            if self.model.cfg.attention != "causal":
                raise UserError("generation tasks need a causal model; this one is a prefix-LM")
            out = []
            for context, gen_kwargs in (req.args for req in requests):
                kwargs = dict(gen_kwargs)
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.pop("max_gen_toks", 256))
                sample = bool(kwargs.pop("do_sample", False))
                temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
                params = SamplingParams(
                    max_new_tokens=max_new, temperature=temperature, top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
                    seed=kwargs.pop("seed", None), stop=tuple(s for s in until if s),
                )  # fmt: skip
                room = max(1, self.max_length - max_new)
                prompt = self.tok_encode(context)[-room:] or [self.prefix_token_id]
                text = generate(self.model, [prompt], params, self.tokenizer)[0].text
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                out.append(text)
            return out

    register_model(MODEL_NAME)(MoelabLM)
    return MoelabLM


def evaluate_tasks(
    path: str | Path,
    tasks: Sequence[str],
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    seed: int = 0,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Run harness ``tasks`` on the model at ``path``; return ``{"results": {task: {metric: value}}, ...}``.

    ``include_path`` adds a folder of task YAML files (local tasks over local data); nothing is
    downloaded by moelab, though a harness task that names a Hub dataset will try to fetch it.
    """
    lm_eval = _require_lm_eval()
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise UserError("--tasks is empty: name one or more harness tasks (comma-separated)")
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include-path {include_path} is not a folder of task YAML files")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown harness task(s) {', '.join(unknown)}: see `lm-eval ls tasks`, or --include-path DIR")
    lm = _harness_model_class()(path=str(path), device=device, batch_size=batch_size, dtype=dtype)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        log_samples=False,
    )  # fmt: skip
    results = {task: {k: _plain(v) for k, v in metrics.items() if k != "alias"} for task, metrics in out["results"].items()}
    return {"checkpoint": str(path), "tasks": list(tasks), "num_fewshot": num_fewshot, "limit": limit, "dtype": dtype,
            "results": results, "n_samples": out.get("n-samples", {})}  # fmt: skip


def _plain(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v if isinstance(v, (int, float, str)) or v is None else str(v)


def format_task_results(result: dict[str, Any]) -> str:
    """One line per task and metric: ``task  metric  value ± stderr``."""
    lines = [f"{result['checkpoint']}: {len(result['results'])} task(s)"]
    for task, metrics in result["results"].items():
        for key, value in metrics.items():
            if "_stderr" in key or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(key.replace(",", "_stderr,", 1))
            err = f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else ""
            lines.append(f"  {task:<24} {key:<24} {value:.4f}{err}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """The harness's own command line with the ``moelab`` model registered."""
    _harness_model_class()
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
