"""Cached, batched generation: equal to the uncached reference token by token; sampling; maj@K."""

from __future__ import annotations

import pytest
import torch

from moe.config import EvalConfig, ModelConfig
from moe.data.tokenizer import ByteTokenizer
from moe.eval.evaluate import evaluate_task, majority_vote
from moe.eval.generate import Sampling, generate_ids, generate_texts, pick_next
from moe.model import MoELM
from moe.tasks import Task, TaskData, TaskItem
from moe.tasks.answers import number_key
from moe.tasks.pocket import final_number_matches

torch.set_num_threads(1)


def random_model(**kw) -> MoELM:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_experts=4, top_k=2, seq_len=64,
                      init_std=0.3, **kw)
    return MoELM(cfg).eval()


def prompts_of(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_cached_equals_uncached_token_by_token(kv_heads):
    model, tok = random_model(n_kv_heads=kv_heads), ByteTokenizer()
    prompts = prompts_of([5, 17, 1, 30, 9, 12])  # ragged: left padding in every batch
    budgets = [20, 7, 25, 12, 0, 20]
    kw = dict(tokenizer=tok, stop=("\n\n",), seq_len=64)
    ref = generate_ids(model, prompts, budgets, batch_size=1, use_cache=False, **kw)
    for batch_size in (1, 3, 6):
        got = generate_ids(model, prompts, budgets, batch_size=batch_size, **kw)
        assert got == ref
    assert [len(r) for r in ref] != [0] * 6 and ref[4] == []


def test_cached_logits_equal_full_forward():
    model = random_model()
    prompts = prompts_of([3, 8])
    full = [model(torch.tensor([p])).logits_BTV[0, -1] for p in prompts]
    idx_BT = torch.tensor([[257] * 5 + prompts[0], prompts[1]])
    cache = model.new_cache(torch.tensor([5, 0]), 12)
    last_BV = model(idx_BT, cache=cache).logits_BTV[:, -1]
    for r in range(2):
        torch.testing.assert_close(last_BV[r], full[r], rtol=1e-5, atol=1e-5)
    nxt = [7, 9]
    step_BV = model(torch.tensor([[7], [9]]), cache=cache).logits_BTV[:, -1]
    for r in range(2):
        ref = model(torch.tensor([prompts[r] + [nxt[r]]])).logits_BTV[0, -1]
        torch.testing.assert_close(step_BV[r], ref, rtol=1e-5, atol=1e-5)
    assert cache.length == 9


def test_sampling_is_seeded_and_top_p_cuts_the_tail():
    model, tok = random_model(), ByteTokenizer()
    prompts = prompts_of([6, 6, 10])
    kw = dict(tokenizer=tok, stop=(), seq_len=64, batch_size=3)
    hot = Sampling(temperature=1.5, top_p=1.0, seed=3)
    a = generate_ids(model, prompts, [15] * 3, sampling=hot, **kw)
    assert a == generate_ids(model, prompts, [15] * 3, sampling=hot, **kw)
    assert a != generate_ids(model, prompts, [15] * 3, sampling=Sampling(temperature=1.5,
                                                                          seed=4), **kw)
    greedy = generate_ids(model, prompts, [15] * 3, **kw)
    tiny_p = Sampling(temperature=1.5, top_p=1e-6, seed=3)  # only the argmax survives
    assert generate_ids(model, prompts, [15] * 3, sampling=tiny_p, **kw) == greedy
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])  # probs .64 .24 .09 .03
    g = torch.Generator().manual_seed(0)
    draws = {int(pick_next(logits, Sampling(temperature=1.0, top_p=0.8), g))
             for _ in range(300)}
    assert draws == {0, 1}


class CoinLM(torch.nn.Module):
    """After ':' a space; after a space '4' (p = 0.6) or '7' (p = 0.4); then a newline."""

    def forward(self, idx_BT):
        logits = torch.full((*idx_BT.shape, 258), -1e9)
        logits[..., ord(" ")] = torch.where(idx_BT == ord(":"), 0.0, -1e9)
        space = idx_BT == ord(" ")
        logits[..., ord("4")] = torch.where(space, torch.tensor(0.6).log(), -1e9)
        logits[..., ord("7")] = torch.where(space, torch.tensor(0.4).log(), -1e9)
        logits[..., ord("\n")] = torch.where(space | (idx_BT == ord(":")), -1e9, 0.0)
        return type("Out", (), {"logits_BTV": logits})()


def test_majority_at_k_with_a_fixed_seed():
    tok = ByteTokenizer()
    items = (TaskItem(prompt="A:", answer=" 4", targets=("4",)),
             TaskItem(prompt="B:", answer=" 7", targets=("7",)))
    task = Task(name="coin", kind="reasoning", description="", n_shots=0,
                loader=lambda _: TaskData(items=items, shot_pool=items),
                is_correct=final_number_matches, stop=("\n",), vote_key=number_key)
    data = task.loader(None)
    cfg = EvalConfig(samples=15, temperature=1.0, top_p=1.0, seed=0)
    m = evaluate_task(CoinLM(), tok, task, data, cfg, 64)
    assert m["accuracy"] == 0.5  # greedy says 4 to both
    # The reference: the same seeded samples, voted by hand.
    prompts = [tuple(tok.encode(i.prompt)) for i in items for _ in range(15)]
    texts = generate_texts(CoinLM(), prompts, [12] * 30, tokenizer=tok, stop=("\n",),
                           seq_len=64, batch_size=16, sampling=Sampling(temperature=1.0, seed=0))
    assert {t.strip() for t in texts} == {"4", "7"}
    votes = [sorted(texts[n * 15:(n + 1) * 15]) for n in range(2)]
    expected = sum(max(set(v), key=v.count).strip() == i.targets[0]
                   for v, i in zip(votes, items, strict=True)) / 2
    assert m["maj@15"] == expected == 0.5
    assert majority_vote([" 7", " x", " 4", " 4.0", " 7"], number_key) == " 7"  # tie: earliest
    assert majority_vote([" x", " y"], number_key) == " x"  # nobody voted


def test_a_prompt_too_long_for_its_budget_keeps_its_newest_tokens():
    model, tok = random_model(), ByteTokenizer()  # seq_len 64
    prompts = prompts_of([60, 20])
    kw = dict(tokenizer=tok, stop=(), seq_len=64, batch_size=2)
    got = generate_ids(model, prompts, [10, 10], **kw)
    cut = [p[-54:] for p in prompts]  # 64 - 10 positions left for the prompt
    assert got == generate_ids(model, cut, [10, 10], use_cache=False, **kw)
    assert [len(g) for g in got] == [10, 10]


def test_moe_eval_samples_reports_maj_at_k_on_a_pocket_task(tmp_path):
    from helpers import tiny_config
    from moe.app.cli import main as moe_main
    from moe.checkpoint import save_checkpoint
    from moe.config import config_hash
    from moe.io import read_json
    from moe.rundir import RunDir

    cfg = tiny_config("model.seq_len=64", "data.pocket_eval_items=6")
    run = RunDir(tmp_path / "run")
    run.write_config(cfg)
    torch.manual_seed(0)
    save_checkpoint(run, 0, {"model": MoELM(cfg.model).state_dict(), "step": 0,
                             "run_id": config_hash(cfg)})
    argv = ["eval", str(run.path), "--tasks", "pocket-reasoning", "--max-items", "6",
            "--samples", "3"]
    results = []
    for out in ("a.json", "b.json"):
        assert moe_main([*argv, "--out", str(tmp_path / out)]) == 0
        results.append(read_json(tmp_path / out)["tasks"]["pocket-reasoning"])
    assert results[0] == results[1]  # seeded: the same samples, the same vote
    assert 0.0 <= results[0]["maj@3"] <= 1.0 and results[0]["accuracy"] is not None
