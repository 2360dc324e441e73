"""Export to transformers: same logits as the toolkit, refusal of what Mixtral cannot express,
the byte tokenizer's equivalent, `moe.load_model`, and lm-eval on the export."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch

import moe
from helpers import tiny_config
from moe.app.cli import main as moe_main
from moe.checkpoint import save_checkpoint
from moe.config import config_hash
from moe.data.tokenizer import ByteTokenizer
from moe.export import ExportError, export_hf, hf_state_dict
from moe.export.harness import INSTALL_HINT, cached_export, harness_args, run_harness
from moe.model import MoELM
from moe.rundir import RunDir

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
torch.set_num_threads(1)


def saved_run(tmp_path: Path, *overrides: str, step: int = 0) -> Path:
    """A run directory holding a random-init model saved by the toolkit's own checkpoint."""
    cfg = tiny_config("model.init_std=0.3", *overrides)
    run = RunDir(tmp_path / "run")
    run.write_config(cfg)
    torch.manual_seed(1)
    model = MoELM(cfg.model)
    save_checkpoint(run, step, {"model": model.state_dict(), "step": step,
                                "run_id": config_hash(cfg)})
    return run.path


def hf_logits(out: Path, idx_BT: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    model.eval()
    with torch.no_grad():
        return model(idx_BT).logits


@pytest.mark.parametrize("overrides, arch", [
    (("model.n_experts=4", "model.top_k=2"), "MixtralForCausalLM"),
    (("model.n_experts=4", "model.top_k=3", "model.n_kv_heads=1"), "MixtralForCausalLM"),
    (("model.n_experts=1", "model.top_k=1"), "LlamaForCausalLM"),
    (("model.n_experts=1", "model.top_k=1", "model.tie_embeddings=true"), "LlamaForCausalLM"),
    (("model.n_experts=4", "model.top_k=2", "model.norm_topk_prob=false"), "Qwen2MoeForCausalLM"),
])
def test_transformers_logits_equal_the_toolkits(tmp_path, overrides, arch):
    run_dir = saved_run(tmp_path, *overrides)
    out = export_hf(run_dir, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
    idx_BT = torch.randint(0, 258, (3, 32), generator=torch.Generator().manual_seed(0))
    ours = moe.load_model(run_dir)
    assert not ours.training
    with torch.no_grad():
        want = ours(idx_BT).logits_BTV
    got = hf_logits(out, idx_BT)
    assert want.std() > 0.1  # not a near-uniform model that any weights would match
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_bad_dtype_is_refused(tmp_path):
    run_dir = saved_run(tmp_path)
    with pytest.raises(ExportError, match="float32 or bfloat16"):
        export_hf(run_dir, tmp_path / "hf", dtype="float16")
    assert not (tmp_path / "hf").exists()


def test_fused_gate_up_layout_maps_to_the_same_weights(tmp_path):
    cfg = tiny_config()
    state = MoELM(cfg.model).state_dict()
    fused = {}
    for k, v in state.items():
        if k.endswith("w1_EDH"):
            fused[k.replace("w1_EDH", "w13_ED2H")] = torch.cat(
                [v, state[k.replace("w1_EDH", "w3_EDH")]], dim=-1)
        elif not k.endswith("w3_EDH"):
            fused[k] = v
    a, b = hf_state_dict(state, cfg.model), hf_state_dict(fused, cfg.model)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_byte_tokenizer_export_encodes_like_the_toolkit(tmp_path):
    out = export_hf(saved_run(tmp_path), tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Question: 12 + 7 = ?\nAnswer: héllo wörld 日本 #### 19\n\n"
    ids = ByteTokenizer().encode(text)
    assert hf_tok(text)["input_ids"] == ids
    assert hf_tok.decode(ids) == text
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (256, 257)


def test_cli_export_and_cached_harness_export(tmp_path, capsys):
    run_dir = saved_run(tmp_path, step=3)
    assert moe_main(["export", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    first = cached_export(run_dir)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert cached_export(run_dir) == first  # cached: not rewritten
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert json.loads((first / "export.json").read_text())["step"] == 3


def test_harness_arguments_and_missing_lm_eval(tmp_path, monkeypatch, capsys):
    args = harness_args(tmp_path, ["gsm8k", "hellaswag"], device="cpu", batch_size=4, limit=10)
    assert args["model"] == "hf" and args["model_args"]["pretrained"] == str(tmp_path)
    assert args["tasks"] == ["gsm8k", "hellaswag"] and args["limit"] == 10
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    run_dir = saved_run(tmp_path)
    assert moe_main(["eval", str(run_dir), "--harness", "gsm8k"]) == 69  # a missing package
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and INSTALL_HINT in err


@pytest.mark.slow
def test_lm_eval_on_the_export_matches_our_loglikelihoods(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    rows = [{"prompt": "Q: What is 2+2?\nA:", "answer": " 4"},
            {"prompt": "Q: Colour of the sky?\nA:", "answer": " blue"}]
    data = tmp_path / "local.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local.yaml").write_text(
        f"task: local_qa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: loglikelihood\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n'
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n")
    run_dir = saved_run(tmp_path, "model.init_std=0.05")
    out = run_harness(run_dir, ["local_qa"], batch_size=2, include_path=tasks)
    assert RunDir(run_dir).harness_path.is_file()
    model, tok = moe.load_model(run_dir), ByteTokenizer()
    lls = []
    for r in rows:  # lm-eval: log p(answer | prompt), no BOS/EOS before the prompt
        ids = tok.encode(r["prompt"] + r["answer"])
        n = len(tok.encode(r["answer"]))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits_BTV[0, :-1], -1)
        lls.append(sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n, len(ids))))
    ppl = out["results"]["local_qa"]["perplexity,none"]
    assert ppl == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-4)


def test_export_refuses_a_directory_it_did_not_write_unless_forced(tmp_path, capsys):
    run_a = saved_run(tmp_path / "a")
    run_b = saved_run(tmp_path / "b", "model.d_model=48")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("someone's files")
    assert moe_main(["export", str(run_a), "--out", str(busy)]) == 2
    assert str(busy) in capsys.readouterr().err and not (busy / "model.safetensors").exists()
    hf = tmp_path / "hf"
    assert moe_main(["export", str(run_a), "--out", str(hf)]) == 0
    weights = (hf / "model.safetensors").read_bytes()
    assert moe_main(["export", str(run_a), "--out", str(hf)]) == 0  # its own: refreshed
    assert moe_main(["export", str(run_b), "--out", str(hf)]) == 2  # another model's export
    assert "--force" in capsys.readouterr().err
    assert (hf / "model.safetensors").read_bytes() == weights
    assert moe_main(["export", str(run_b), "--out", str(hf), "--force"]) == 0
    assert (hf / "model.safetensors").read_bytes() != weights
    assert moe_main(["export", str(run_a), "--out", str(busy), "--force"]) == 0


def test_exported_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = export_hf(saved_run(tmp_path), tmp_path / "hf")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == 0o644  # POSIX: 0666 & ~022
    assert set(modes.values()) == {0o644}, modes
