"""Task registry, real-task loaders on fixture files, and answer extraction (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe.config import DataConfig
from moe.tasks import KINDS, TaskDataError, TaskItem, get_task, list_tasks
from moe.tasks.answers import (
    extract_boxed,
    extract_number,
    matches_any,
    math_equal,
    normalize_text,
    numbers_equal,
)
from moe.tasks.real import _hellaswag_clean

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
REAL = ("gsm8k", "gsm-plus", "triviaqa", "hellaswag", "math500")


@pytest.fixture
def fixture_data(monkeypatch):
    monkeypatch.setenv("MOE_TASK_DATA", str(FIXTURES))


def test_registry_declares_kinds():
    names = list_tasks()
    assert {"pocket-memorization", "pocket-reasoning", *REAL} <= set(names)
    assert all(get_task(n).kind in KINDS for n in names)
    kinds = {n: get_task(n).kind for n in names}
    assert kinds["pocket-memorization"] == kinds["triviaqa"] == kinds["hellaswag"] == "memorization"
    assert kinds["pocket-reasoning"] == kinds["gsm8k"] == kinds["gsm-plus"] == "reasoning"
    assert get_task("gsm8k").n_shots == 4
    with pytest.raises(ValueError, match="unknown task 'nope'.*gsm8k"):
        get_task("nope")


@pytest.mark.parametrize("text, number", [
    ("She has 12 + 15 = 27 pencils.\n#### 27", "27"),
    ("It makes 1,200 / 12 = 100 dozen.\n#### 1,200", "1200"),
    ("It is 4 - 9 = -5 degrees.\n#### -5", "-5"),
    ("#### $1,000.50", "1000.50"),
    ("no marker: first 3, then 17, finally 42.", "42"),
    ("the temperature ends at -12", "-12"),
    ("first #### 5 then a correction #### 6", "6"),
    ("####", None),
    ("no number at all", None),
    ("#### 7 apples and 9 pears", "7"),
])
def test_extract_number(text, number):
    assert extract_number(text) == number


def test_numbers_compare_by_value():
    assert numbers_equal("1,000", "1000.0")
    assert numbers_equal("-5", "-5.00")
    assert numbers_equal("42.", "42")
    assert not numbers_equal("5", "-5")
    assert not numbers_equal(None, "5")
    assert not numbers_equal("five", "5")


def test_triviaqa_normalisation():
    assert normalize_text("The  Pacific Ocean!") == "pacific ocean"
    assert matches_any(" the Pacific", ("Pacific Ocean", "Pacific"))
    assert matches_any("Paris, France.", ("Paris", "Paris, France"))
    assert not matches_any("Lyon", ("Paris",))
    assert not matches_any("   ", ("",))


def test_math_answers():
    assert extract_boxed("so $x = \\boxed{\\frac{3}{4}}$.") == "\\frac{3}{4}"
    assert extract_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert extract_boxed("\\boxed{unclosed") is None
    assert math_equal("\\dfrac{3}{4}", "\\frac{3}{4}")
    assert math_equal(" 11 ", "11.0")
    assert not math_equal(None, "1")


def test_real_tasks_load_public_schemas(fixture_data):
    gsm = get_task("gsm8k").load(DataConfig())
    assert len(gsm.items) == 3 and len(gsm.shot_pool) == 5
    first = gsm.items[0]
    assert first.prompt.startswith("Question: Mia has 12 pencils") and first.prompt.endswith(
        "\nAnswer:")
    assert first.answer.startswith(" She buys") and first.answer.endswith("#### 27")
    assert [i.targets[0] for i in gsm.items] == ["27", "200", "-5"]

    plus = get_task("gsm-plus").load(DataConfig())
    assert len(plus.items) == 7  # the critical-thinking item (answer "None") is skipped
    assert plus.items[0].answer.endswith("\n#### 29") and plus.items[0].targets == ("29",)
    assert plus.shot_pool == plus.items  # GSM-Plus has no train split

    tqa = get_task("triviaqa").load(DataConfig()).items[0]
    assert tqa.answer == " Mars" and "The Red Planet" in tqa.targets

    hs = get_task("hellaswag").load(DataConfig()).items
    assert hs[0].prompt == ("Making tea: A man fills a kettle with water and puts it on the "
                            "stove. He")
    assert [i.label for i in hs] == [0, 1, 2] and all(len(i.choices) == 4 for i in hs)
    assert hs[1].answer == hs[1].choices[1] == (" turns the mower around at the fence and mows "
                                                "the next strip.")
    assert get_task("math500").load(DataConfig()).items[2].targets == ("\\frac{3}{4}",)


def test_hellaswag_cleanup():
    assert _hellaswag_clean(" throws it [title] Then he sleeps. ") == "throws it. Then he sleeps."


def test_parquet_equals_jsonl(tmp_path, monkeypatch):
    import pandas as pd

    rows = [json.loads(line) for line in
            (FIXTURES / "triviaqa" / "validation.jsonl").read_text().splitlines()]
    (tmp_path / "triviaqa").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "triviaqa" / "validation.parquet")
    monkeypatch.setenv("MOE_TASK_DATA", str(tmp_path))
    from_parquet = get_task("triviaqa").load(DataConfig()).items
    monkeypatch.setenv("MOE_TASK_DATA", str(FIXTURES))
    assert from_parquet == get_task("triviaqa").load(DataConfig()).items


@pytest.mark.parametrize("name, file", [("gsm8k", "gsm8k/test.jsonl"),
                                        ("triviaqa", "triviaqa/validation.jsonl"),
                                        ("hellaswag", "hellaswag/validation.jsonl")])
def test_missing_data_is_a_one_line_error(tmp_path, monkeypatch, name, file):
    monkeypatch.setenv("MOE_TASK_DATA", str(tmp_path))
    with pytest.raises(TaskDataError) as err:
        get_task(name).load(DataConfig())
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / file) in message and "huggingface.co/datasets/" in message


def test_task_file_that_is_not_utf8_is_an_error_naming_it(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    bad = tmp_path / "gsm8k" / "test.jsonl"
    bad.write_bytes('{"question": "caf\xe9?", "answer": "#### 1"}\n'.encode("latin-1"))
    monkeypatch.setenv("MOE_TASK_DATA", str(tmp_path))
    with pytest.raises(TaskDataError, match=f"{bad} is not UTF-8 text"):
        get_task("gsm8k").load(DataConfig())


def test_malformed_row_names_the_schema(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q?", "solution": "1"}\n')
    monkeypatch.setenv("MOE_TASK_DATA", str(tmp_path))
    with pytest.raises(TaskDataError, match="gsm8k test row 1 .*openai/gsm8k schema"):
        get_task("gsm8k").load(DataConfig())


def test_items_subset_and_shots_are_deterministic(fixture_data):
    task = get_task("gsm-plus")
    data = task.load(DataConfig(), max_items=4)
    assert data == task.load(DataConfig(), max_items=4) and len(data.items) == 4
    for i, item in enumerate(data.items):
        shots = task.shots_for(item, i, data.shot_pool, 3)
        assert shots == task.shots_for(item, i, data.shot_pool, 3)
        assert len(set(shots)) == 3 and item not in shots
        assert all(s.group_key != item.group_key for s in shots)  # no variant of the same seed
    with pytest.raises(TaskDataError, match="needs 7 few-shot examples"):
        task.shots_for(data.items[0], 0, data.shot_pool, 7)


def test_pocket_tasks_come_from_the_corpus():
    cfg = DataConfig(pocket_entities=20, pocket_eval_items=8)
    mem = get_task("pocket-memorization").load(cfg)
    assert len(mem.items) == 8 and mem.items[0].prompt.startswith("Q: What is the ")
    assert mem.items[0].answer == " " + mem.items[0].targets[0]
    rea = get_task("pocket-reasoning").load(cfg, max_items=5)
    assert len(rea.items) == 5
    assert all(i.answer.endswith(f"#### {i.targets[0]}") for i in rea.items)


def test_item_validation():
    with pytest.raises(TaskDataError, match="empty answer"):
        TaskItem(prompt="p", answer="", targets=())
    with pytest.raises(TaskDataError, match="label 2"):
        TaskItem(prompt="p", answer=" a", targets=(), choices=(" a", " b"), label=2)
