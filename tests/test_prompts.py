"""The one prompt-set registry (`visalign.prompts`): formats, built-in sets, one spelling, shared by trainers and
benchmarks."""

import dataclasses
import importlib
import json
from collections import Counter

import pytest

from visalign import prompts
from visalign.preflight import prompts_problem
from visalign.prompts import (
    BUILTIN_SETS,
    PROMPT_FORMATS,
    PromptFormat,
    PromptItem,
    PromptSet,
    TestPoint,
    guess_format,
    load_prompt_set,
    load_prompts,
    write_prompt_set,
)
from visalign.world.evaluate import heldout_prompts
from visalign.world.scenes import CATEGORIES, prompt_split


def test_every_registered_loader_resolves_and_every_builtin_set_loads():
    for name, fmt in PROMPT_FORMATS.items():
        module, _, attr = fmt.loader.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
        assert fmt.suffixes and all(s.startswith(".") for s in fmt.suffixes), name
    for name in BUILTIN_SETS:
        assert len(load_prompt_set(name)) > 0, name


def test_world_sets_are_what_the_trainers_always_read():
    assert load_prompts("world:heldout") == [p.text for p in heldout_prompts()]
    assert load_prompts("world:train") == [p.text for group in prompt_split("train").values() for p in group]
    train, test = load_prompt_set("world:train"), load_prompt_set("world:test")
    assert not {it.text for it in train.items} & {it.text for it in test.items}
    assert train.primary_criteria == CATEGORIES and train.items[0].extras["world"]["category"] == "single_object"


def test_the_balanced_train_set_weighs_every_category_about_the_same():
    balanced = load_prompt_set("world:train-balanced")
    per_category = Counter(it.extras["world"]["category"] for it in balanced.items)
    sizes = {c: len(g) for c, g in prompt_split("train").items()}
    assert set(per_category) == set(CATEGORIES) and max(sizes.values()) / min(sizes.values()) > 100
    assert max(per_category.values()) / min(per_category.values()) < 1.06
    assert {it.text for it in balanced.items} == set(load_prompts("world:train"))
    for category, n in per_category.items():  # every prompt of a category repeated the same number of times
        assert n % sizes[category] == 0 and Counter(
            it.text for it in balanced.items if it.extras["world"]["category"] == category
        ) == dict.fromkeys((p.text for p in prompt_split("train")[category]), n // sizes[category])
    assert len({it.id for it in balanced.items}) == len(balanced.items)


def test_the_old_spelling_is_an_error_naming_the_new_one(tmp_path, capsys):
    with pytest.raises(ValueError, match="now called 'world:heldout'"):
        load_prompt_set("world-heldout")
    with pytest.raises(ValueError, match="now called 'world:heldout'"):
        load_prompts("world-heldout")
    assert "world:heldout" in prompts_problem("world-heldout")
    from visalign.cli import main

    argv = ["bench", "run", "--set", "world-heldout", "--judge", "world", "--images", str(tmp_path), "--out", "x"]
    assert main(argv) == 2
    assert "now called 'world:heldout'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="world:heldout, world:train, world:train-balanced, world:test"):
        load_prompt_set("world:validation")


def test_trainers_read_every_registered_format(tmp_path):
    item = PromptItem("a-1", "two red circles", test_points=(TestPoint("counting", "two red circles"),))
    jsonl = write_prompt_set(PromptSet("mine", [item]), tmp_path / "mine.jsonl")
    assert load_prompts(str(jsonl)) == ["two red circles"]
    text = tmp_path / "color_val.txt"
    text.write_text("a red circle\n\n a blue square \n")
    assert guess_format(text) == "text" and load_prompts(str(text)) == ["a red circle", "a blue square"]
    assert load_prompt_set(text).items[0].test_points[0].criterion == "color"
    assert load_prompt_set(text, "t2i-compbench").license.startswith("MIT")
    odd = tmp_path / "prompts.lst"
    odd.write_text("a cat\n")
    assert ".lst is none of" in prompts_problem(str(odd))
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_prompts(str(odd))


def test_a_new_format_is_one_registry_entry(tmp_path, monkeypatch):
    def load_lines_json(path):  # a list of strings as JSON
        texts = json.loads(open(path).read())
        return PromptSet("json-list", [PromptItem(f"{i}", t) for i, t in enumerate(texts)])

    monkeypatch.setattr("visalign.prompts.load_lines_json", load_lines_json, raising=False)
    monkeypatch.setitem(PROMPT_FORMATS, "json-list", PromptFormat("visalign.prompts:load_lines_json", (".json",)))
    path = tmp_path / "p.json"
    path.write_text('["a cat", "a dog"]')
    assert prompts_problem(str(path)) is None
    assert load_prompts(str(path)) == ["a cat", "a dog"]  # the trainers' reader
    from visalign.benchmarks.prompts import load_prompt_set as bench_load

    assert bench_load(path).name == "json-list"  # the benchmarks' reader is the same registry


def test_builtin_sets_take_no_format_and_files_no_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="`format` is for prompt files"):
        load_prompt_set("world:heldout", "world")
    path = tmp_path / "p.txt"
    path.write_text("a cat\n")
    with pytest.raises(ValueError, match="`format` must be one of"):
        load_prompt_set(path, "yaml")


def test_benchmarks_share_the_core_types():
    from visalign.benchmarks import prompts as bench

    assert bench.PromptSet is PromptSet and bench.load_prompt_set is load_prompt_set
    assert bench.FORMATS == tuple(PROMPT_FORMATS)
    held = bench.load_world_heldout()
    assert dataclasses.asdict(held.items[0]) == dataclasses.asdict(load_prompt_set("world:heldout").items[0])
    assert prompts.primary_of("Attribute - Color") == "Attribute"
