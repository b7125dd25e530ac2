import csv
import hashlib
import json

import pytest

from visalign.benchmarks import taxonomy
from visalign.benchmarks.prompts import (
    PromptItem,
    PromptSet,
    TestPoint,
    load_prompt_set,
    load_unigenbench_csv,
    load_visalign_jsonl,
    write_prompt_set,
)


def dims(theme, sub, points, spans, sentence="Descriptive", pad=""):
    """A UniGenBench `sub_dims_en` JSON string; `pad` adds the stray spaces found in published keys."""
    return json.dumps(
        {
            f"Primary Categories{pad}": theme,
            f"Secondary Categories{pad}": sub,
            "Subjects": "Animal",
            "Sentence Structure": sentence,
            f"Testpoints{pad}": points,
            "Testpoint Description": spans,
        }
    )


@pytest.fixture
def ugb_csv(tmp_path):
    rows = [
        [
            "0",
            "two pandas painted in ink",
            dims("Art ", "Art-Graphic Art", ["Style", "Attribute -Quantity "], ["ink", "two pandas"], pad=" "),
        ],
        # the published long English file has a row whose test points lack a comma: broken JSON
        [
            "1",
            "a fox with no tail",
            '{"Primary Categories": "Art", "Secondary Categories": "Graphic Art", '
            '"Testpoints": ["Grammar - Negation" "Attribute - Color"], '
            '"Testpoint Description": ["no tail", "red fox"]}',
        ],
        ["2", "a diagram of a cell", dims("Illustration", "Mapping-Content Mapping", ["World Knowledge"], ["cell"])],
        ["3", "a red cube", dims("Design", "Design-Space Design", ["Attribute - Color", "Style"], ["red"])],
        ["4", "a rose that smells", dims("Art", "Photography Art", ["Attribute - Smell"], ["smells"])],
        [
            "5",
            "a whale in the sky",
            dims(
                "Creative Divergence",
                "Creativity divergence-imagination divergence",
                ["Compound - Imagination"],
                ["whale in the sky"],
                "descriptive sentence pattern",
            ),
        ],
        ["6", "a logo of a bee", dims("Design", "Logo/icon design", ["Text Generation"], ["bee"])],
    ]
    path = tmp_path / "test_prompts_en.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "prompt_en", "sub_dims_en"])
        w.writerows(rows)
    return path


def test_unigenbench_csv_reports_bad_rows_and_aliases_labels(ugb_csv):
    s = load_unigenbench_csv(ugb_csv)
    assert [it.id for it in s.items] == ["0", "2", "4", "5", "6"]  # rows 2 (broken JSON) and 4 (lengths) skipped
    issues = {i.row: i.message for i in s.issues}
    assert sorted(issues) == [2, 4, 5]
    assert "not valid JSON" in issues[2] and "'1'" in issues[2]
    assert "differ" in issues[4]
    assert "Attribute - Smell" in issues[5] and "kept" in issues[5]
    first = s.items[0]
    assert (first.theme, first.subtheme) == ("Art", "Graphic Art")  # trailing spaces and theme prefix removed
    assert [tp.criterion for tp in first.test_points] == ["Style", "Attribute - Quantity"]
    assert first.test_points[1].primary == "Attribute"  # not "Attribute " as upstream's scorer keys it
    assert (s.items[1].theme, s.items[1].subtheme) == ("Illustration", "Content Illustration")
    assert s.items[3].subtheme == "Imaginative Thinking" and s.items[3].extras["sentence"] == "Descriptive"
    assert s.items[4].subtheme == "Logo/Icon Design"
    assert s.sha256 == hashlib.sha256(ugb_csv.read_bytes()).hexdigest()
    assert s.source == str(ugb_csv)
    assert s.primary_criteria == taxonomy.PRIMARY_CRITERIA
    assert any("row 2" in line for line in s.record()["issues"])


def test_unigenbench_chinese_csv(tmp_path):
    sub = {
        "一级垂类": "配图",
        "二级垂类": "内容配图",
        "主体": "动物",
        "考点": ["属性-数量", "动作-人物/拟人手部动作"],
        "句式": "指令式句式",
        "考点对应描述": ['"三只猫"', "用手"],
    }
    path = tmp_path / "test_prompts_zh.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["index", "prompt_zh", "sub_dims_zh"], ["7", "三只猫", json.dumps(sub)]])
    item = load_unigenbench_csv(path).items[0]
    assert [tp.criterion for tp in item.test_points] == [
        "Attribute - Quantity",
        "Action - Hand (Character/Anthropomorphic)",
    ]
    assert item.test_points[0].span == "三只猫"
    assert (item.theme, item.subtheme, item.extras["sentence"], item.extras["lang"]) == (
        "Illustration",
        "Content Illustration",
        "Imperative",
        "zh",
    )


def test_unigenbench_csv_with_wrong_columns_fails(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("id,text\n1,a cat\n")
    with pytest.raises(ValueError, match="expected columns"):
        load_unigenbench_csv(path)


def test_builtin_core_set_covers_the_taxonomy():
    s = load_prompt_set("visalign-core")
    assert len(s) == 60 and s.license and s.sha256
    assert {tp.criterion for it in s.items for tp in it.test_points} == set(taxonomy.CRITERIA)
    assert {(it.theme, it.subtheme) for it in s.items} == {(t, x) for t, d in taxonomy.SUBTHEMES.items() for x in d}
    assert s.primary_criteria == taxonomy.PRIMARY_CRITERIA
    for it in s.items:  # spans quote the prompt
        for tp in it.test_points:
            assert all(part.lower() in it.text.lower() for part in tp.span.split(" ... ")), (it.id, tp.span)


def test_world_heldout_is_a_prompt_set():
    from importlib import resources

    from visalign.world.scenes import CATEGORIES, Prompt

    s = load_prompt_set("world:heldout")
    lines = (resources.files("visalign.assets") / "world/heldout.jsonl").read_text().splitlines()[1:]
    world = [Prompt.from_dict(json.loads(line)) for line in lines]  # as visalign.world.evaluate reads it
    assert [it.text for it in s.items] == [p.text for p in world]
    assert [it.test_points[0].criterion for it in s.items] == [p.category for p in world]
    assert s.primary_criteria == CATEGORIES
    position = next(it for it in s.items if it.subtheme == "position")
    first, second = position.extras["world"]["objects"]
    spec = position.test_points[0].spec  # GenEval's order: the related object second, pointing at index 0
    assert spec["include"][1]["class"] == first["shape"] and spec["include"][1]["position"][1] == 0
    counting = next(it for it in s.items if it.subtheme == "counting")
    n = counting.extras["world"]["objects"][0]["count"]
    assert counting.test_points[0].spec["exclude"][0]["count"] == n + 1


def test_visalign_jsonl_round_trip_and_strict_errors(tmp_path):
    s = PromptSet(
        "mine",
        [
            PromptItem(
                "a-1",
                "two cats",
                "Art",
                "Graphic Art",
                (TestPoint("Attribute - Quantity", "two cats", {"include": []}),),
            )
        ],
        version="3",
        license="CC0-1.0",
    )
    path = write_prompt_set(s, tmp_path / "mine.jsonl")
    back = load_prompt_set(path)
    assert back.items == s.items and back.version == "3" and back.license == "CC0-1.0"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1], '{"id": "b", "text": "x"}']) + "\n")
    with pytest.raises(ValueError, match="line 3"):
        load_visalign_jsonl(path)


def test_prompt_ids_must_name_files():
    with pytest.raises(ValueError, match="prompt id 'a_1'"):
        PromptSet("x", [PromptItem("a_1", "t")])
    with pytest.raises(ValueError, match="appears twice"):
        PromptSet("x", [PromptItem("a", "t"), PromptItem("a", "u")])


def test_geneval_parti_and_t2i_compbench(tmp_path):
    geneval = tmp_path / "evaluation_metadata.jsonl"
    lines = [
        {
            "tag": "counting",
            "include": [{"class": "clock", "count": 2}],
            "exclude": [{"class": "clock", "count": 3}],
            "prompt": "a photo of two clocks",
        },
        {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
    ]
    geneval.write_text("\n".join(map(json.dumps, lines)) + "\n{broken\n")
    g = load_prompt_set(geneval)
    assert [it.id for it in g.items] == ["00000", "00001"] and g.issues[0].row == 3
    assert g.items[0].test_points[0].spec["exclude"] == [{"class": "clock", "count": 3}]
    assert g.primary_criteria == ("counting", "colors")

    parti = tmp_path / "PartiPrompts.tsv"
    parti.write_text("Prompt\tCategory\tChallenge\tNote\nA tiger in a tuxedo\tAnimals\tImagination\t\n\t\t\t\n")
    p = load_prompt_set(parti)
    assert len(p) == 1 and p.items[0].theme == "Animals" and p.items[0].test_points[0].criterion == "Imagination"
    assert p.issues[0].row == 2

    t2i = tmp_path / "color_val.txt"
    t2i.write_text("a green bench and a red car\n\na blue bowl\n")
    t = load_prompt_set(t2i)
    assert [it.text for it in t.items] == ["a green bench and a red car", "a blue bowl"]
    assert t.items[0].test_points[0].criterion == "color"


def test_unknown_set_names_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        load_prompt_set("no-such-set")
    odd = tmp_path / "x.json"
    odd.write_text("{}")
    with pytest.raises(ValueError, match="format"):
        load_prompt_set(odd)


@pytest.mark.parametrize("label", ["logo/icon设计", "设计-logo/icon设计", "Logo/icon design", "logo/图标设计"])
def test_chinese_logo_icon_subtheme_labels_are_aliases(label):
    # 13 rows of each published Chinese file carry 设计 / logo/icon设计
    assert taxonomy.canonical_theme("设计") == "Design"
    assert taxonomy.canonical_subtheme("Design", label) == "Logo/Icon Design"
    assert taxonomy.canonical_subtheme("Art", label) is None  # only within its theme
