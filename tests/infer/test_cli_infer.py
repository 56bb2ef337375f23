"""`moelab generate` end to end (the checkpoint loader swapped for an in-code model, and, once
moelab.checkpoint exists, through a real checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch

from moelab import cli
from moelab.infer.generate import SamplingParams, generate
from moelab.model.transformer import Transformer

from helpers import CharTestTokenizer, tiny_config, tiny_moe


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(moe=tiny_moe(num_experts=8))).eval()


@pytest.fixture
def in_code_checkpoint(monkeypatch):
    monkeypatch.setattr(cli, "load_checkpoint_for_inference", lambda path, device, dtype=None: (_model(), CharTestTokenizer()))


def test_generate_command_batches_and_reports_offload_stats(in_code_checkpoint, capsys) -> None:
    argv = ["generate", "ckpt", "--prompt", "Hello", "--prompt", "A longer prompt", "--max-tokens", "8",
            "--ignore-eos", "--json"]
    assert cli.main(argv) == 0
    plain = json.loads(capsys.readouterr().out)["completions"]
    assert cli.main([*argv, "--offload", "--expert-cache", "25%", "--cache-policy", "lfu", "--prefetch",
                     "--offload-from", "memory"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["completions"] == plain
    s = data["offload"]
    assert s["hits"] + s["misses"] == s["lookups"] > 0
    tok = CharTestTokenizer()
    ref = generate(_model(), [tok.encode("Hello")], SamplingParams(8, stop_at_eos=False), tok)[0]
    assert plain[0]["text"] == ref.text and plain[0]["completion_tokens"] == 8


def test_generate_command_streams_one_prompt(in_code_checkpoint, capsys) -> None:
    assert cli.main(["generate", "ckpt", "--prompt", "Hi", "--max-tokens", "5", "--temperature", "0.8",
                     "--seed", "1", "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    tok = CharTestTokenizer()
    ref = generate(_model(), [tok.encode("Hi")], SamplingParams(5, temperature=0.8, seed=1, stop_at_eos=False), tok)[0]
    assert out == "Hi" + ref.text + "\n"


def test_generate_command_errors(in_code_checkpoint, capsys) -> None:
    assert cli.main(["generate", "ckpt"]) == 2
    assert "no prompt" in capsys.readouterr().err
    assert cli.main(["generate", "ckpt", "--prompt", "x", "--top-p", "0"]) == 2
    assert cli.main(["generate", "ckpt", "--prompt", "x", "--offload", "--expert-cache", "0%"]) == 2
    assert "expert cache size" in capsys.readouterr().err


def test_generate_from_a_real_checkpoint(tmp_path, capsys) -> None:
    ckpt = pytest.importorskip("moelab.checkpoint.state")
    tokmod = pytest.importorskip("moelab.data.tokenizer")
    tok = tokmod.BytesTokenizer()
    cfg = tiny_config(vocab_size=tok.vocab_size, max_seq_len=128, moe=tiny_moe(num_experts=8))
    model = Transformer(cfg).eval()
    ckpt.save_checkpoint(tmp_path / "ck", model, cfg, tok)
    ref = generate(model, [tok.encode("abc")], SamplingParams(6, stop_at_eos=False), tok)[0]
    assert cli.main(["generate", str(tmp_path / "ck"), "--prompt", "abc", "--max-tokens", "6", "--ignore-eos",
                     "--json", "--offload", "--expert-cache", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["completions"][0]["text"] == ref.text
    assert data["offload"]["misses"] > 0


def test_serve_command_checks_its_limits(in_code_checkpoint, capsys) -> None:
    assert cli.main(["serve", "ckpt", "--max-pending", "0"]) == 2
    assert "server.max_pending" in capsys.readouterr().err
    assert cli.main(["serve", "ckpt", "--port", "70000"]) == 2


def test_chat_template_from_the_checkpoint_folder(tmp_path) -> None:
    from moelab.infer.chat import DEFAULT_CHAT_TEMPLATE, load_chat_template

    assert load_chat_template(tmp_path).source == DEFAULT_CHAT_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}!"}))
    assert load_chat_template(tmp_path).render([{"role": "user", "content": "hey"}]) == "hey!"
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['role'] }}]{% endfor %}")
    assert load_chat_template(tmp_path).render([{"role": "user", "content": "x"}]) == "[user]"


def test_serve_help_states_the_real_defaults(capsys) -> None:
    from moelab.infer.server import ServerLimits

    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    d = ServerLimits()
    for value in (d.max_body_bytes, d.max_pending, d.max_batch, d.batch_wait_s, d.timeout_s, d.default_max_tokens):
        assert f"(default {value:g})" in text or f"(default {value})" in text


def test_serve_command_answers_over_http(tmp_path) -> None:
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    ckpt = pytest.importorskip("moelab.checkpoint.state")
    tokmod = pytest.importorskip("moelab.data.tokenizer")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    tok = tokmod.BytesTokenizer()
    cfg = tiny_config(vocab_size=tok.vocab_size, max_seq_len=128, moe=tiny_moe(num_experts=8))
    ckpt.save_checkpoint(tmp_path / "ck", Transformer(cfg).eval(), cfg, tok)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(cli.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moelab", "serve", str(tmp_path / "ck"), "--port", str(port),
                             "--offload", "--expert-cache", "2"], env=env, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        r = httpx.post(url + "/v1/completions", json={"prompt": "abc", "max_tokens": 5, "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "ck"
        assert r.json()["usage"]["prompt_tokens"] == 3
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_generate_fast_equals_plain_in_fp32(in_code_checkpoint, monkeypatch, capsys) -> None:
    import moelab.infer.fast_decode as fast_decode

    monkeypatch.setattr(fast_decode, "decode_dtype", lambda device="cpu": torch.float32)
    argv = ["generate", "ckpt", "--prompt", "Hello", "--prompt", "A longer prompt", "--max-tokens", "8",
            "--ignore-eos", "--json"]
    assert cli.main(argv) == 0
    plain = json.loads(capsys.readouterr().out)["completions"]
    assert cli.main([*argv, "--fast"]) == 0
    assert json.loads(capsys.readouterr().out)["completions"] == plain
    assert cli.main(["generate", "ckpt", "--prompt", "x", "--fast", "--offload"]) == 2
    assert "do not combine" in capsys.readouterr().err


def test_generate_fast_runs_in_the_detected_dtype(in_code_checkpoint, capsys) -> None:
    assert cli.main(["generate", "ckpt", "--prompt", "Hi", "--max-tokens", "4", "--ignore-eos", "--fast"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hi") and len(out.splitlines()) == 1  # streamed, as without --fast (one decode loop)


def test_generate_with_a_draft_prints_plain_greedy_output_and_the_acceptance(in_code_checkpoint, capsys) -> None:
    """--draft prompt-lookup and --draft CKPT (here the same in-code model: every draft accepted) give the
    plain command's completion, with the speculation's statistics."""
    argv = ["generate", "ckpt", "--prompt", "abcabcabc", "--max-tokens", "12", "--ignore-eos", "--json"]
    assert cli.main(argv) == 0
    plain = json.loads(capsys.readouterr().out)["completions"]
    for draft in ("prompt-lookup", "draft-ckpt"):
        assert cli.main([*argv, "--draft", draft, "--draft-tokens", "3"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["completions"] == plain
        s = data["speculative"]
        assert s["tokens"] == 12 and s["passes"] == 12 - s["accepted"]
    assert s["acceptance_rate"] == 1.0
    assert cli.main([*argv[:-1], "--draft", "prompt-lookup"]) == 0  # streamed, statistics on stderr
    out, err = capsys.readouterr()
    assert out == "abcabcabc" + plain[0]["text"] + "\n" and "draft tokens accepted" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", "y"], "one prompt"),
        (["--temperature", "0.5"], "greedy"),
        (["--fast"], "--fast"),
        (["--offload"], "--offload"),
        (["--draft-tokens", "0"], "--draft-tokens"),
    ],
)
def test_generate_draft_limits_are_one_line_errors(in_code_checkpoint, capsys, extra, message) -> None:
    assert cli.main(["generate", "ckpt", "--prompt", "x", "--draft", "prompt-lookup", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
