"""Downstream tasks through lm-evaluation-harness, offline: local YAML tasks over JSONL files the test
writes, scored by moelab's harness model and by the harness's own transformers model (HFLM) on the same
exported weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from moelab.cli import main
from moelab.convert.hf import export_hf, save_moelab
from moelab.data.tokenizer import train_bpe
from moelab.model.transformer import Transformer

from helpers import tiny_config, tiny_moe

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs", "far", "away", "into", "green", "hills"]


def _texts(n: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (12,), generator=g).tolist()) for _ in range(n)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny MoE with a BPE tokenizer, as a moelab folder and as its Hugging Face (Mixtral) export,
    plus a task folder: one multiple-choice task and one generation task over local JSONL."""
    root = tmp_path_factory.mktemp("harness")
    tok = train_bpe(_texts(50), vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tok.vocab_size, moe=tiny_moe(), max_seq_len=48)).eval()
    save_moelab(model, root / "moelab")
    tok.save(root / "moelab")
    export_hf(model, root / "hf", family="mixtral")
    tok.save(root / "hf")

    tasks = root / "tasks"
    tasks.mkdir()
    g = torch.Generator().manual_seed(1)
    with open(tasks / "mc.jsonl", "w") as f:
        for i, text in enumerate(_texts(12)):
            choices = [w for w in torch.randperm(len(WORDS), generator=g)[:4].tolist()]
            f.write(json.dumps({"question": text, "choices": [WORDS[c] for c in choices], "answer": i % 4}) + "\n")
    with open(tasks / "gen.jsonl", "w") as f:
        for text in _texts(6):
            f.write(json.dumps({"prompt": text, "target": text.split()[-1]}) + "\n")
    with open(tasks / "ppl.jsonl", "w") as f:  # documents longer than the 48-token context: several windows
        for i in range(3):
            f.write(json.dumps({"text": " ".join(_texts(8)[i:i + 5])}) + "\n")
    (tasks / "ppl.yaml").write_text(
        f"""task: moelab_test_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / "ppl.jsonl"}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
"""
    )
    (tasks / "mc.yaml").write_text(
        f"""task: moelab_test_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""
    )
    (tasks / "gen.yaml").write_text(
        f"""task: moelab_test_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / "gen.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""
    )
    return {"moelab": root / "moelab", "hf": root / "hf", "tasks": tasks}


def _samples(lm, tasks: Path) -> dict:
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=lm, tasks=["moelab_test_mc", "moelab_test_gen", "moelab_test_ppl"], task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )  # fmt: skip
    return out


def test_scores_equal_transformers_on_the_exported_weights(folders) -> None:
    """Every per-choice log-likelihood, every rolling (perplexity) log-likelihood and every generated
    text equals HFLM's on the Mixtral export."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from moelab.experiment.harness import _harness_model_class

    ours = _samples(_harness_model_class()(path=str(folders["moelab"]), batch_size=5), folders["tasks"])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_file=str(folders["hf"] / "tokenizer.json"), eos_token="<|eos|>", bos_token="<|bos|>",
        pad_token="<|pad|>",
    )  # fmt: skip
    hf_model = AutoModelForCausalLM.from_pretrained(folders["hf"], torch_dtype=torch.float32).eval()
    theirs = _samples(HFLM(pretrained=hf_model, tokenizer=hf_tok, batch_size=3), folders["tasks"])

    for task in ("moelab_test_mc", "moelab_test_gen", "moelab_test_ppl"):
        a, b = ours["samples"][task], theirs["samples"][task]
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            if task.endswith("ppl"):
                assert x["resps"][0][0] == pytest.approx(y["resps"][0][0], rel=1e-5)
            elif task.endswith("mc"):
                ll_a = [r[0][0] for r in x["resps"]]
                ll_b = [r[0][0] for r in y["resps"]]
                assert ll_a == pytest.approx(ll_b, abs=2e-4)
                assert [r[0][1] for r in x["resps"]] == [r[0][1] for r in y["resps"]]
            else:
                assert x["resps"] == y["resps"]
    for task, metric in [("moelab_test_mc", "acc,none"), ("moelab_test_mc", "acc_norm,none"),
                         ("moelab_test_gen", "exact_match,none")]:  # fmt: skip
        assert ours["results"][task][metric] == theirs["results"][task][metric]


def test_batched_scores_equal_one_row_at_a_time(folders) -> None:
    """Right padding cannot leak into a causal model's real positions; windows longer than the
    context keep their last tokens; a one-token continuation works."""
    from moelab.convert.load import load_model
    from moelab.experiment.harness import _Scorer

    model, _ = load_model(folders["moelab"])
    g = torch.Generator().manual_seed(2)
    pairs = [
        (torch.randint(3, 200, (n,), generator=g).tolist(), torch.randint(3, 200, (m,), generator=g).tolist())
        for n, m in [(1, 1), (5, 3), (30, 1), (60, 10), (2, 47), (10, 60)]
    ]
    batched = _Scorer(model, max_length=48, batch_size=6).score(pairs)
    single = [_Scorer(model, max_length=48, batch_size=1).score([p])[0] for p in pairs]
    for (a, ga), (b, gb) in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    # the first pair by hand: log_softmax of the model's last logits at the continuation token
    ctx, cont = pairs[0]
    with torch.no_grad():
        logits = model(torch.tensor([ctx])).logits[0, -1]
    assert batched[0][0] == pytest.approx(torch.log_softmax(logits, -1)[cont[0]].item(), abs=1e-5)


def test_prefix_lm_scores_with_the_context_as_prefix() -> None:
    """A prefix-LM's context is bidirectional: a later context token changes an earlier context
    position's representation, so the score differs from the same weights read causally."""
    from moelab.experiment.harness import _Scorer

    torch.manual_seed(0)
    prefix_model = Transformer(tiny_config(attention="prefix")).eval()
    causal_model = Transformer(tiny_config()).eval()
    causal_model.load_state_dict(prefix_model.state_dict())
    pair = ([5, 6, 7, 8], [9, 10])
    prefix = _Scorer(prefix_model, 64, 2).score([pair])[0][0]
    causal = _Scorer(causal_model, 64, 2).score([pair])[0][0]
    with torch.no_grad():
        ids = torch.tensor([pair[0] + pair[1][:-1]])
        logp = torch.log_softmax(prefix_model(ids, prefix_len=torch.tensor([4])).logits[0], -1)
    assert prefix == pytest.approx((logp[3, 9] + logp[4, 10]).item(), abs=1e-5)
    assert abs(prefix - causal) > 1e-4


def test_eval_tasks_command(folders, capsys, tmp_path) -> None:
    code = main(["eval", str(folders["moelab"]), "--tasks", "moelab_test_mc", "--include-path", str(folders["tasks"]),
                 "--limit", "5", "--json"])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["results"]) == {"moelab_test_mc"}
    assert 0.0 <= result["results"]["moelab_test_mc"]["acc,none"] <= 1.0
    assert result["n_samples"]["moelab_test_mc"]["effective"] == 5
    assert main(["eval", str(folders["moelab"]), "--tasks", "no_such_task", "--include-path", str(folders["tasks"])]) == 2
    assert "unknown harness task(s) no_such_task" in capsys.readouterr().err


def test_the_harness_model_loads_at_the_asked_dtype(folders) -> None:
    from moelab.experiment.harness import _harness_model_class

    lm = _harness_model_class()(path=str(folders["moelab"]), dtype="bfloat16")
    assert lm.model.embed.weight.dtype == torch.bfloat16
    assert _harness_model_class()(path=str(folders["moelab"])).model.embed.weight.dtype == torch.float32


def test_encoder_is_refused() -> None:
    from moelab.errors import UserError
    from moelab.experiment.harness import _Scorer

    with pytest.raises(UserError, match="attention='bidirectional'"):
        _Scorer(Transformer(tiny_config(attention="bidirectional")), 64, 1)
