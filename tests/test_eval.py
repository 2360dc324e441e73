"""Task losses and accuracies: hand computations, batching, generation, the run integration."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from moe.app.cli import main as moe_main
from moe.config import DataConfig, EvalConfig, ModelConfig, RunConfig, apply_overrides
from moe.data.tokenizer import ByteTokenizer, HFTokenizer
from moe.eval.evaluate import (
    answer_logprobs,
    encode_item,
    encode_pair,
    evaluate_task,
    evaluate_tasks,
    greedy_generate,
    write_eval,
)
from moe.io import atomic_write_json, read_json
from moe.model import IGNORE_INDEX, MoELM
from moe.tasks import Task, TaskData, TaskItem, get_task
from moe.tasks.pocket import final_number_matches

torch.set_num_threads(1)
FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
POCKET = ["model.d_model=64", "model.n_layers=2", "model.n_experts=4", "model.top_k=2",
          "model.seq_len=64", "data.pocket_entities=24", "data.pocket_attributes=2",
          "data.pocket_fact_repeats=12", "data.pocket_arith_problems=100",
          "data.pocket_eval_items=16", "train.batch_size=16", "train.checkpoint_every=1000",
          "train.num_threads=1", "train.warmup_steps=10", "train.weight_decay=0.0",
          'eval.tasks=["pocket-memorization"]', "eval.max_items=16"]
TRAIN_STEPS = 160
ITEM = TaskItem(prompt="Q: What is the pet of Lirodra?\nA:", answer=" ferret", targets=("ferret",))


def tiny_model(vocab_size: int = 258, seq_len: int = 64, seed: int = 0) -> MoELM:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_experts=4, top_k=2,
                      vocab_size=vocab_size, seq_len=seq_len)
    return MoELM(cfg).eval()


def one_item_task(items: tuple[TaskItem, ...], **kw) -> tuple[Task, TaskData]:
    task = Task(name="hand", kind="memorization", description="test", n_shots=0,
                loader=lambda cfg: TaskData(items=items, shot_pool=items), **kw)
    return task, task.load(DataConfig())


def hand_nll(model: MoELM, ids: list[int], start: int) -> float:
    """-sum log p(ids[t] | ids[:t]) for t >= start, straight from the logits."""
    with torch.no_grad():
        logits_TV = model(torch.tensor([ids[:-1]])).logits_BTV[0]
    logp_TV = torch.log_softmax(logits_TV.double(), dim=-1)
    return -sum(float(logp_TV[t - 1, ids[t]]) for t in range(start, len(ids)))


def task_metrics(model, tok, items, seq_len=64, **eval_kw) -> dict:
    task, data = one_item_task(items)
    cfg = EvalConfig(accuracy=False, **eval_kw)
    with torch.no_grad():
        return evaluate_task(model, tok, task, data, cfg, seq_len)


def test_task_loss_by_hand_byte_tokenizer():
    model, tok = tiny_model(), ByteTokenizer()
    ids = [tok.eos_id, *ITEM.prompt.encode(), *ITEM.answer.encode()]
    nats = hand_nll(model, ids, 1 + len(ITEM.prompt.encode()))
    m = task_metrics(model, tok, (ITEM,))
    assert m["loss"] == pytest.approx(nats / 7, rel=1e-5)  # " ferret" is 7 bytes = 7 tokens
    assert m["bits_per_token"] == pytest.approx(nats / 7 / math.log(2), rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(m["bits_per_token"], rel=1e-9)
    assert m["n_items"] == 1 and m["accuracy"] is None and m["kind"] == "memorization"
    # The model's own masked cross-entropy agrees: only the answer tokens are scored.
    tgt = torch.tensor([[t if i + 1 >= 1 + len(ITEM.prompt) else IGNORE_INDEX
                         for i, t in enumerate(ids[1:])]])
    with torch.no_grad():
        ce = model(torch.tensor([ids[:-1]]), tgt).ce_loss
    assert m["loss"] == pytest.approx(float(ce), rel=1e-5)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moe.data.pocket import build_pocket

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    docs = list(build_pocket(DataConfig(pocket_entities=30)).documents[:2000])
    hf.train_from_iterator(docs + ["abcdef abcdef abcdef"] * 50, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    hf.save(str(path))
    return HFTokenizer(path)


def test_task_loss_by_hand_bpe_tokenizer(bpe):
    model = tiny_model(vocab_size=bpe.vocab_size)
    prompt_ids, answer_ids = bpe.encode(ITEM.prompt), bpe.encode(ITEM.answer)
    ids = [bpe.eos_id, *bpe.encode(ITEM.prompt + ITEM.answer)]
    assert ids[1:] == prompt_ids + answer_ids and len(answer_ids) < 7  # merges happened
    nats = hand_nll(model, ids, 1 + len(prompt_ids))
    m = task_metrics(model, bpe, (ITEM,))
    assert m["loss"] == pytest.approx(nats / len(answer_ids), rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(nats / math.log(2) / 7, rel=1e-5)
    assert m["bits_per_token"] > m["bits_per_byte"]


def test_answer_span_with_a_token_across_the_boundary(bpe):
    """A token holding the prompt's end and the answer's start is scored as an answer token."""
    ids = bpe.encode("abcdef")
    assert len(ids) == 1  # merged into one token
    enc = encode_pair(bpe, "abc", "def", seq_len=64)
    assert enc.ids == (bpe.eos_id, ids[0]) and enc.start == 1 and enc.n_bytes == 3
    enc = encode_pair(ByteTokenizer(), "abc", "déf", seq_len=64)
    assert enc.start == 4 and enc.n_answer_tokens == 4 and enc.n_bytes == 4


def test_batched_equals_unbatched():
    model, tok = tiny_model(), ByteTokenizer()
    data = get_task("pocket-reasoning").load(DataConfig(pocket_eval_items=12))
    items = data.items + get_task("pocket-memorization").load(DataConfig()).items[:5]
    examples = [encode_pair(tok, i.prompt, i.answer, 64) for i in items]
    assert len({len(e.ids) for e in examples}) > 3  # ragged: padding is exercised
    with torch.no_grad():
        one = answer_logprobs(model, examples, batch_size=1, pad_id=tok.pad_id)
        many = answer_logprobs(model, examples, batch_size=6, pad_id=tok.pad_id)
    assert many == pytest.approx(one, rel=1e-5, abs=1e-6)
    a = task_metrics(model, tok, items, batch_size=1)
    b = task_metrics(model, tok, items, batch_size=16)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)


def test_long_prompts_drop_earliest_shots_then_tokens():
    tok, task = ByteTokenizer(), get_task("pocket-reasoning")
    data = task.load(DataConfig(), max_items=1)
    item, shots = data.items[0], task.shots_for(data.items[0], 0, data.shot_pool, 2)
    roomy = encode_item(task, tok, item, shots, (item.answer,), 1024)[0]
    assert bytes(roomy.ids[1:]).decode() == task.context(item, shots) + item.answer
    one_shot = len(task.context(item, shots[1:]) + item.answer) + 1
    fit = encode_item(task, tok, item, shots, (item.answer,), one_shot)[0]
    assert bytes(fit.ids[1:]).decode() == task.context(item, shots[1:]) + item.answer
    tight = encode_item(task, tok, item, shots, (item.answer,), 64)[0]
    assert len(tight.ids) == 65 and bytes(tight.ids[tight.start:]).decode() == item.answer
    with pytest.raises(ValueError, match="does not fit model.seq_len=16"):
        encode_item(task, tok, item, shots, (item.answer,), 16)


class BigramLM(torch.nn.Module):
    """Greedy next byte is a fixed function of the current byte (a scripted 'model')."""

    def __init__(self, script: dict[str, int]):
        super().__init__()
        table = torch.zeros(258, 258)
        for char, nxt in script.items():
            table[ord(char), nxt] = 1.0
        self.table = table

    def forward(self, idx_BT):
        return type("Out", (), {"logits_BTV": self.table[idx_BT]})()


def test_greedy_generation_stops_and_extracts():
    tok = ByteTokenizer()
    model = BigramLM({":": ord(" "), " ": ord("4"), "4": ord("2"), "2": ord("\n"),
                      "?": ord("x"), "x": ord("x"), "!": tok.eos_id})
    prompts = [tuple(b"Solution:"), tuple(b"What?"), tuple(b"Hi!"), tuple(b"A:")]
    texts = greedy_generate(model, prompts, [10, 5, 10, 2], tokenizer=tok, stop=("\n",),
                            seq_len=8, batch_size=3)
    assert texts == [" 42", "xxxxx", "", " 4"]  # stop string, budget, EOS, budget
    item = TaskItem(prompt="Solution:", answer=" 6 * 7 = 42. #### 42", targets=("42",))
    task, data = one_item_task((item,), is_correct=final_number_matches)
    m = evaluate_task(model, tok, task, data, EvalConfig(), 64)
    assert m["accuracy"] == 1.0


def test_multiple_choice_accuracy_is_acc_norm(monkeypatch):
    tok = ByteTokenizer()
    # Every byte predicts "a" with certainty: " aaaa" is likelier per character than " ab".
    model = BigramLM({chr(c): ord("a") for c in range(256)})
    item = TaskItem(prompt="ctx", answer=" aaaa", targets=(" aaaa",), choices=(" ab", " aaaa"),
                    label=1)
    task, data = one_item_task((item,))
    m = evaluate_task(model, tok, task, data, EvalConfig(), 64)
    assert m["accuracy"] == 1.0
    task, data = one_item_task((TaskItem(**{**item.__dict__, "label": 0, "answer": " ab"}),))
    assert evaluate_task(model, tok, task, data, EvalConfig(), 64)["accuracy"] == 0.0


def test_real_tasks_on_fixtures(monkeypatch):
    monkeypatch.setenv("MOE_TASK_DATA", str(FIXTURES))
    model, tok = tiny_model(seq_len=512), ByteTokenizer()
    model.train()
    cfg = RunConfig(model=model.cfg, eval=EvalConfig(max_items=0, accuracy=False, batch_size=8))
    names = ["gsm8k", "gsm-plus", "triviaqa", "hellaswag", "math500"]
    results = evaluate_tasks(model, tok, cfg, names)
    assert model.training  # the caller's mode is restored
    assert list(results) == names
    for r in results.values():
        assert set(r) == {"kind", "loss", "bits_per_token", "bits_per_byte", "accuracy",
                          "n_items"}
        assert 4.0 < r["loss"] < 7.0  # untrained: about ln(258) = 5.55 nats per byte
    assert results["gsm-plus"]["n_items"] == 7 and results["gsm8k"]["kind"] == "reasoning"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, RunConfig]:
    from moe.train import train_run

    cfg = apply_overrides(RunConfig(), [*POCKET, f"train.tokens={TRAIN_STEPS * 16 * 64}"])
    run_dir = tmp_path_factory.mktemp("run") / "pocket-tiny"
    train_run(cfg, run_dir)
    return run_dir, cfg


def test_training_lowers_memorization_loss(trained_run):
    from moe.checkpoint import load_run_model

    run_dir, cfg = trained_run
    names = ["pocket-memorization", "pocket-reasoning"]
    trained = evaluate_tasks(load_run_model(run_dir)[0], ByteTokenizer(), cfg, names)
    torch.manual_seed(cfg.train.seed)
    untrained = evaluate_tasks(MoELM(cfg.model), ByteTokenizer(), cfg, names)
    mem, mem0 = trained["pocket-memorization"], untrained["pocket-memorization"]
    assert mem0["loss"] == pytest.approx(math.log(258), abs=0.3)
    assert mem["loss"] < 0.3 * mem0["loss"]  # measured: 0.97 vs 5.56 nats per answer byte
    assert trained["pocket-reasoning"]["loss"] < untrained["pocket-reasoning"]["loss"]
    # train_run evaluated the config's tasks at the end, into eval.json and result.json
    assert read_json(run_dir / "eval.json")["tasks"]["pocket-memorization"] == pytest.approx(mem)
    assert read_json(run_dir / "result.json")["task/pocket-memorization/loss"] == pytest.approx(
        mem["loss"])


def test_batched_generation_equals_unbatched(trained_run):
    from moe.checkpoint import load_run_model

    run_dir, cfg = trained_run
    model, tok = load_run_model(run_dir)[0], ByteTokenizer()
    items = get_task("pocket-memorization").load(cfg.data, max_items=8).items
    prompts = [encode_pair(tok, i.prompt, i.answer, 64) for i in items]
    prompts = [e.ids[: e.start] for e in prompts]
    kw = dict(tokenizer=tok, stop=("\n",), seq_len=64)
    with torch.no_grad():
        one = greedy_generate(model, prompts, [12] * 8, batch_size=1, **kw)
        many = greedy_generate(model, prompts, [12] * 8, batch_size=8, **kw)
    assert one == many and any(t.strip() for t in one)


def test_moe_eval_cli(trained_run, tmp_path, capsys, monkeypatch):
    run_dir, _ = trained_run
    argv = ["eval", str(run_dir), "--tasks", "pocket-memorization,pocket-reasoning",
            "--max-items", "8"]
    assert moe_main(argv) == 0
    tasks = read_json(run_dir / "eval.json")["tasks"]
    assert set(tasks) == {"pocket-memorization", "pocket-reasoning"}
    result = read_json(run_dir / "result.json")
    for name, metrics in tasks.items():
        assert metrics["n_items"] == 8 and 0.0 <= metrics["accuracy"] <= 1.0
        for key in ("loss", "bits_per_token", "bits_per_byte"):
            assert math.isfinite(metrics[key]) and result[f"task/{name}/{key}"] == metrics[key]
        assert result[f"task/{name}/kind"] == metrics["kind"]
    assert tasks["pocket-reasoning"]["kind"] == "reasoning"

    out = tmp_path / "other.json"
    before = (run_dir / "result.json").read_bytes()
    assert moe_main([*argv[:2], "--tasks", "pocket-memorization", "--max-items", "4",
                     "--no-accuracy", "--out", str(out)]) == 0
    assert read_json(out)["tasks"]["pocket-memorization"]["n_items"] == 4
    assert (run_dir / "result.json").read_bytes() == before  # --out leaves the run as it is

    monkeypatch.setenv("MOE_TASK_DATA", str(tmp_path / "empty"))
    capsys.readouterr()
    assert moe_main(["eval", str(run_dir), "--tasks", "gsm8k"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: task gsm8k has no data") and "\n" not in err
    assert "gsm8k/test.jsonl" in err


def test_write_eval_merges(tmp_path):
    a = {"kind": "memorization", "loss": 1.0, "bits_per_token": 1.44, "bits_per_byte": 1.44,
         "accuracy": None, "n_items": 3}
    write_eval(tmp_path, {"x": a})
    atomic_write_json(tmp_path / "result.json", {"run_id": "r"})
    write_eval(tmp_path, {"y": {**a, "kind": "reasoning"}}, step=7)
    ev = read_json(tmp_path / "eval.json")
    assert set(ev["tasks"]) == {"x", "y"} and ev["step"] == 7
    result = read_json(tmp_path / "result.json")
    assert result["run_id"] == "r" and result["task/y/kind"] == "reasoning"
    assert result["task/y/accuracy"] is None and "task/x/loss" not in result


def test_task_scoring_and_generation_run_in_the_runs_precision():
    """bf16 runs are scored and generate under bf16 autocast, as they trained: every matmul
    but the router's in bf16 (`moe.model.precision`); fp32 runs stay fp32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from moe.data.tokenizer import tokenizer_for_data
    from tests.helpers import tiny_config

    class Matmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name.split("::")[-1] in ("mm", "addmm", "bmm", "torch_grouped_mm"):
                self.dtypes.append((args[0].dtype, args[0].shape[-1], args[1].shape[-1]))
            return func(*args, **(kwargs or {}))

    for precision, matmul_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        cfg = tiny_config(f"train.precision={precision}", 'eval.tasks=["pocket-reasoning"]',
                          "eval.max_items=2", "eval.accuracy=true", "model.experts_backend=torch",
                          "model.seq_len=128")
        torch.manual_seed(0)
        model = MoELM(cfg.model)
        with Matmuls() as rec:
            evaluate_tasks(model, tokenizer_for_data(cfg.data.source), cfg)
        router = [d for d, _, width in rec.dtypes if width == cfg.model.n_experts]
        others = {d for d, _, width in rec.dtypes if width != cfg.model.n_experts}
        assert router and set(router) == {torch.float32}
        assert others == {matmul_dtype}, (precision, others)
