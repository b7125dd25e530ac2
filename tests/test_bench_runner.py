import dataclasses
import hashlib
import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from visalign import cli
from visalign.benchmarks.judges import WorldJudge
from visalign.benchmarks.prompts import PromptItem, PromptSet, TestPoint, load_prompt_set, write_prompt_set
from visalign.benchmarks.run_folder import MissingImagesError, generate_images, image_name, load_pixels, save_png
from visalign.benchmarks.runner import BenchConfig, run_bench
from visalign.benchmarks.vlm import ReplayVLM, VLMJudge
from visalign.testing import save_tiny, tiny_pipeline
from visalign.world.scenes import CATEGORIES, Prompt, render_prompt

GEN = {"num_inference_steps": 2, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd")


@pytest.fixture(scope="module")
def world12():
    """Two held-out world prompts per category."""
    s = load_prompt_set("world:heldout")
    items = [it for c in CATEGORIES for it in [i for i in s.items if i.subtheme == c][:2]]
    return dataclasses.replace(s, items=items)


def render(items, folder, n=2, wrong=(), seed=0):
    """World renders of each prompt; for (prompt id, image id) in `wrong`, a render of the next prompt instead."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k, it in enumerate(items):
        for j in range(n):
            source = items[(k + 1) % len(items)] if (it.id, j) in wrong else it
            save_png(
                torch.from_numpy(render_prompt(Prompt.from_dict(source.extras["world"]), rng)),
                folder / image_name(it.id, j),
            )
    return folder


class Spy:
    """Forwards calls to a pipeline and records (prompt, seed) of each image; dies like a killed process after
    `batches` calls."""

    def __init__(self, pipe, batches=10**6):
        self.pipe, self.left, self.calls = pipe, batches, []

    def __call__(self, **kw):
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        self.calls += [(p, g.initial_seed()) for p, g in zip(kw["prompt"], kw["generator"])]
        return self.pipe(**kw)


def test_resume_after_a_kill_regenerates_nothing(pipe, tmp_path):
    items = [
        PromptItem(f"p{i}", t)
        for i, t in enumerate(["a red circle", "two blue squares", "a green triangle", "three circles"])
    ]
    kw = dict(images_per_prompt=2, batch_size=2, generation=GEN)
    with pytest.raises(KeyboardInterrupt):
        generate_images(Spy(pipe, batches=2), items, tmp_path / "a", **kw)
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.png")}
    assert sorted(done) == ["p0_0.png", "p1_0.png", "p2_0.png", "p3_0.png"]
    (tmp_path / "a" / "p3_1.png.tmp").write_bytes(b"cut short")  # a write the kill interrupted
    spy = Spy(pipe)
    assert generate_images(spy, items, tmp_path / "a", **kw) == {"generated": 4, "cached": 4}
    assert sorted(spy.calls) == sorted((it.text, 3407 + 1) for it in items)  # only the missing images, image id 1
    assert all((tmp_path / "a" / name).stat().st_mtime_ns == t for name, t in done.items())
    generate_images(pipe, items, tmp_path / "b", **kw)  # uninterrupted
    for it in items:
        for j in range(2):
            a, b = (
                load_pixels(tmp_path / "a" / image_name(it.id, j)),
                load_pixels(tmp_path / "b" / image_name(it.id, j)),
            )
            assert (a - b).abs().max() <= 1 / 255 + 1e-6


def test_bench_run_matches_the_world_evaluation(world12, tmp_path):
    from visalign.world.evaluate import accuracy

    wrong = {(world12.items[k].id, 1) for k in (0, 3, 7, 10)}
    images = render(world12.items, tmp_path / "images", wrong=wrong)
    set_file = write_prompt_set(world12, tmp_path / "world12.jsonl")
    code = cli.main(
        [
            "bench",
            "run",
            "--set",
            str(set_file),
            "--images",
            str(images),
            "--judge",
            "world",
            "--out",
            str(tmp_path / "run"),
            "--images-per-prompt",
            "2",
            "--bootstrap",
            "100",
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    order = [(it, j) for it in world12.items for j in range(2)]
    pixels = torch.stack([load_pixels(images / image_name(it.id, j)) for it, j in order])
    expected = accuracy(pixels, [Prompt.from_dict(it.extras["world"]) for it, _ in order])
    assert {k: c["accuracy"] for k, c in summary["primary"].items()} == pytest.approx(expected["per_category"])
    assert summary["overall"]["accuracy"] == pytest.approx(expected["overall"])
    assert summary["overall"]["accuracy"] < 1
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["prompt_set"]["sha256"] == hashlib.sha256(set_file.read_bytes()).hexdigest()
    assert record["prompt_set"]["source"] == str(set_file)
    assert record["judge"]["name"] == "world" and record["seeds"] is None
    # the one run record (visalign.files.run_record): the judged images and the prompt file are hashed inputs
    assert record["inputs"]["prompt_set"]["sha256"] == record["prompt_set"]["sha256"]
    assert record["inputs"]["images"]["sha256"] and record["versions"]["visalign"] and record["config"]["seed"]
    lines = (tmp_path / "run" / "verdicts.jsonl").read_text().splitlines()
    assert (
        len(lines) == 24 and {"prompt_id", "image_id", "sha256", "test_points", "raw"} <= json.loads(lines[0]).keys()
    )
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Overall (mean of 6 primary criteria)" in md and "## Sub-criteria" not in md  # single-level criteria


def test_missing_images_are_refused_unless_allowed(world12, tmp_path, capsys):
    images = render(world12.items, tmp_path / "images")
    for name in ("world-000_0.png", "world-000_1.png", f"{world12.items[5].id}_1.png"):
        (images / name).unlink()
    set_file = write_prompt_set(world12, tmp_path / "world12.jsonl")
    args = [
        "bench",
        "run",
        "--set",
        str(set_file),
        "--images",
        str(images),
        "--judge",
        "world",
        "--out",
        str(tmp_path / "run"),
        "--images-per-prompt",
        "2",
        "--bootstrap",
        "0",
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "3 of 24 images are missing" in err and "--allow-missing" in err
    assert not (tmp_path / "run" / "summary.json").exists()
    assert cli.main(args + ["--allow-missing"]) == 0
    assert "3 images were missing" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["images"] == {"judged": 21, "missing": 3, "all_pass": 1.0}
    assert sum(c["total"] for c in summary["primary"].values()) == 21
    with pytest.raises(MissingImagesError):
        run_bench(world12, WorldJudge(), BenchConfig(str(tmp_path / "run2"), images_per_prompt=2), images_dir=images)


class CountingWorldJudge(WorldJudge):
    def __init__(self):
        self.seen = []

    def judge(self, samples):
        self.seen += [(s.item.id, s.image_id) for s in samples]
        return super().judge(samples)


def test_verdicts_are_cached_until_an_image_changes(world12, tmp_path):
    images = render(world12.items[:4], tmp_path / "images")
    subset = dataclasses.replace(world12, items=world12.items[:4])
    config = BenchConfig(str(tmp_path / "run"), images_per_prompt=2, bootstrap=0)
    judge = CountingWorldJudge()
    first = run_bench(subset, judge, config, images_dir=images)
    assert len(judge.seen) == 8
    with (tmp_path / "run" / "verdicts.jsonl").open("a") as f:
        f.write('{"prompt_id": "world-0')  # a line cut short by a kill
    assert run_bench(subset, judge, config, images_dir=images) == first and len(judge.seen) == 8
    changed = subset.items[2].id
    render([subset.items[3]], tmp_path / "other", n=1)
    (tmp_path / "other" / image_name(subset.items[3].id, 0)).replace(images / image_name(changed, 0))
    run_bench(subset, judge, config, images_dir=images)
    assert judge.seen[8:] == [(changed, 0)]
    assert len((tmp_path / "run" / "verdicts.jsonl").read_text().splitlines()) == 8


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def test_bench_report_escapes_prompts_and_reasons(tmp_path):
    evil = '<script>alert("pwned")</script> a red <b>circle</b>'
    item = PromptItem("x-1", evil, "Art", "<i>Other</i>", (TestPoint("Attribute - Color", "<u>red</u>"),))
    prompt_set = PromptSet("evil", [item], primary_criteria=("Attribute",))
    images = tmp_path / "images"
    images.mkdir()
    save_png(torch.rand(3, 32, 32), images / "x-1_0.png")
    judge = VLMJudge(ReplayVLM({("x-1", 0): "<analysis>['<script>no</script>']</analysis><score>[0]</score>"}))
    run_bench(
        prompt_set, judge, BenchConfig(str(tmp_path / "run"), images_per_prompt=1, bootstrap=0), images_dir=images
    )
    page = (tmp_path / "run" / "report.html").read_text()
    parser = Tags()
    parser.feed(page)
    assert "script" not in parser.tags and "<script" not in page.lower()
    assert "<b>circle" not in page and "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in page
    assert "&lt;script&gt;no&lt;/script&gt;" in page and "&lt;i&gt;Other&lt;/i&gt;" in page
    assert page.count("data:image/png;base64,") == 1


def test_generation_through_the_cli_follows_the_seed_protocol(pipe, tmp_path, capsys):
    folder = save_tiny(pipe, tmp_path / "model")
    run = tmp_path / "run"
    args = [
        "bench",
        "run",
        "--set",
        "world:heldout",
        "--limit",
        "2",
        "--model",
        str(folder),
        "--judge",
        "world",
        "--out",
        str(run),
        "--images-per-prompt",
        "2",
        "--num-inference-steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--seed",
        "11",
        "--bootstrap",
        "0",
    ]
    assert cli.main(args) == 0
    assert sorted(p.name for p in (run / "images").glob("*.png")) == [
        "world-000_0.png",
        "world-000_1.png",
        "world-001_0.png",
        "world-001_1.png",
    ]
    record = json.loads((run / "record.json").read_text())
    assert record["seeds"] == [11, 12] and record["model"] == str(folder)
    assert record["generation"] == GEN and record["generated"] == {"generated": 4, "cached": 0}
    text = load_prompt_set("world:heldout").items[1].text
    direct = pipe(prompt=[text], generator=[torch.Generator().manual_seed(12)], output_type="pt", **GEN).images[0]
    assert (load_pixels(run / "images" / "world-001_1.png") - direct).abs().max() <= 1 / 255 + 1e-6
    assert cli.main(args) == 0  # rerun: everything cached
    assert json.loads((run / "record.json").read_text())["generated"] == {"generated": 0, "cached": 4}
    assert cli.main([a if a != "11" else "12" for a in args]) == 2  # other seeds must not reuse these images
    assert "were generated with" in capsys.readouterr().err


def test_compare_and_convert_commands(world12, tmp_path, capsys):
    set_file = write_prompt_set(world12, tmp_path / "world12.jsonl")
    base = render(world12.items, tmp_path / "base", wrong={(it.id, 0) for it in world12.items[::2]})
    better = render(world12.items, tmp_path / "better", wrong={(world12.items[0].id, 0)})
    for name, images, judge in (("a", base, "world"), ("b", better, "world"), ("c", better, "rules:world")):
        assert (
            cli.main(
                [
                    "bench",
                    "run",
                    "--set",
                    str(set_file),
                    "--images",
                    str(images),
                    "--judge",
                    judge,
                    "--out",
                    str(tmp_path / name),
                    "--images-per-prompt",
                    "2",
                    "--bootstrap",
                    "200",
                ]
            )
            == 0
        )
    capsys.readouterr()
    assert cli.main(["bench", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab")]) == 0
    assert "Overall:" in capsys.readouterr().out
    result = json.loads((tmp_path / "ab" / "compare.json").read_text())
    a, b = (json.loads((tmp_path / n / "summary.json").read_text()) for n in "ab")
    for name, cell in result["primary"].items():
        assert cell["delta"] == pytest.approx(b["primary"][name]["accuracy"] - a["primary"][name]["accuracy"])
    assert result["overall"]["delta"] == pytest.approx(b["overall"]["accuracy"] - a["overall"]["accuracy"])
    assert result["overall"]["delta"] > 0
    lo, hi = result["overall"]["ci"]
    assert lo <= result["overall"]["delta"] <= hi
    assert (tmp_path / "ab" / "compare.html").is_file() and (tmp_path / "ab" / "compare.md").is_file()
    assert cli.main(["bench", "compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    assert "judged differently" in capsys.readouterr().err
    assert cli.main(["bench", "compare", str(tmp_path / "a"), str(tmp_path / "c"), "--allow-judge-mismatch"]) == 0
    assert cli.main(["bench", "convert", "visalign-core", str(tmp_path / "core.jsonl")]) == 0
    assert load_prompt_set(tmp_path / "core.jsonl").items == load_prompt_set("visalign-core").items


def test_unigenbench_run_reports_failed_judgments_strict_overall_and_bad_rows(tmp_path):
    """A UniGenBench CSV with a row that does not parse and a judge answer that does not parse: the row is named by
    its number in record.json, Overall leaves the failed judgment out (the official scorer's rule), and every report
    shows the failed count and the strict Overall beside it."""
    import csv

    def dims(points):
        return json.dumps(
            {"一级垂类": "设计", "二级垂类": "logo/icon设计", "考点": points, "考点对应描述": ["x"] * len(points)},
            ensure_ascii=False,
        )

    path = tmp_path / "test_prompts_zh.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(
            [
                ["index", "prompt_zh", "sub_dims_zh"],
                ["0", "一只红色的猫", dims(["风格", "属性-颜色"])],
                ["1", "坏行", '{"考点": ["风格" "属性-颜色"]}'],
                ["2", "两只狗", dims(["风格"])],
            ]
        )
    prompt_set = load_prompt_set(path)
    assert [it.subtheme for it in prompt_set.items] == ["Logo/Icon Design"] * 2
    images = tmp_path / "images"
    images.mkdir()
    for name in ("0_0", "0_1", "2_0", "2_1"):
        save_png(torch.rand(3, 16, 16), images / f"{name}.png")
    answers = {
        ("0", 0): "<analysis>['a', 'b']</analysis><score>[1, 0]</score>",
        ("0", 1): "no tags at all",  # a failed judgment of both test points
        ("2", 0): "<analysis>['a']</analysis><score>[1]</score>",
        ("2", 1): "<analysis>['a']</analysis><score>[0]</score>",
    }
    config = BenchConfig(str(tmp_path / "run"), images_per_prompt=2, bootstrap=0)
    two = dataclasses.replace(prompt_set, primary_criteria=("Style", "Attribute"))
    summary = run_bench(two, VLMJudge(ReplayVLM(answers)), config, images_dir=images)
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert any(issue.startswith("row 2:") and "not valid JSON" in issue for issue in record["prompt_set"]["issues"])
    overall = summary["overall"]
    # official: Style 2/3 (image 0_1 left out), Attribute 0/1; strict: Style 2/4, Attribute 0/2
    assert overall["accuracy"] == pytest.approx((2 / 3 + 0) / 2) and overall["policy"] == "exclude"
    assert overall["failed"] == {"test_points": 2, "images": 1}
    assert overall["strict"] == pytest.approx((2 / 4 + 0) / 2)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["overall"] == overall
    expected = "failed judgments: 2 test points on 1 images (left out, as the official scorer does)"
    for report in ("report.md", "report.html"):
        text = (tmp_path / "run" / report).read_text()
        assert expected in text and "strict Overall (failures counted wrong): 25.00%" in text
    assert "Prompt-file rows skipped or changed: 1 (row 2:" in (tmp_path / "run" / "report.md").read_text()
