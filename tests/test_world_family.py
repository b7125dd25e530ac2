"""A world model folder of another family than the one expected is an error naming the folder and both families."""

import shutil

import pytest

from visalign.cli import main
from visalign.loading import check_world_family, load_generator
from visalign.preflight import model_problem
from visalign.world import models

SHIPPED_SD = models.default_model_dir("sd")
SHIPPED_SD3 = models.default_model_dir("sd3")


@pytest.fixture
def swapped(tmp_path, monkeypatch):
    """A world folder whose `sd3` is the epsilon SD pipeline and whose `sd` is the flow SD3 pipeline."""
    root = tmp_path / "world"
    shutil.copytree(SHIPPED_SD, root / "sd3")
    shutil.copytree(SHIPPED_SD3, root / "sd")
    monkeypatch.setattr(models, "default_model_dir", lambda family: root / family)
    return root


def test_the_shipped_folders_are_their_own_families():
    check_world_family("world:sd", "sd")
    check_world_family("world:sd3", "sd3")
    check_world_family(SHIPPED_SD3, "sd3")


def test_a_folder_of_another_family_names_the_folder_and_both_families():
    match = f"{SHIPPED_SD}.*`sd3` family \\(a StableDiffusion3Pipeline\\).*`sd` family's StableDiffusionPipeline"
    with pytest.raises(ValueError, match=match):
        check_world_family(SHIPPED_SD, "sd3")
    with pytest.raises(ValueError, match="`sd` family \\(a StableDiffusionPipeline\\).*`sd3` family's"):
        check_world_family(str(SHIPPED_SD3), "sd")
    with pytest.raises(ValueError, match="`family` must be one of"):
        check_world_family(SHIPPED_SD, "flux")


def test_the_loader_and_preflight_refuse_a_world_name_holding_another_family(swapped):
    with pytest.raises(ValueError, match=f"world:sd3 \\({swapped / 'sd3'}\\): expected .* `sd3` family"):
        load_generator("world:sd3")
    with pytest.raises(ValueError, match="expected .* `sd` family .* StableDiffusion3Pipeline"):
        load_generator("world:sd")
    assert "expected a world model of the `sd3` family" in model_problem("world:sd3")


def test_world_eval_with_a_model_of_another_family_is_a_usage_error(capsys):
    argv = ["world", "eval", "--family", "sd3", "--model", str(SHIPPED_SD), "--limit-per-category", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "`sd3` family (a StableDiffusion3Pipeline)" in err and str(SHIPPED_SD) in err


def test_world_base_benchmark_refuses_a_model_of_another_family(tmp_path, monkeypatch):
    from visalign.benchmarks import world_base

    monkeypatch.setattr(world_base, "evaluate", lambda *a, **k: pytest.fail("evaluated a model of another family"))
    argv = ["--families", "sd3", "--model", str(SHIPPED_SD), "--out", str(tmp_path / "out.json")]
    with pytest.raises(ValueError, match="`sd3` family"):
        world_base.main(argv)
    assert not (tmp_path / "out.json").exists()


def test_the_demo_refuses_a_model_of_another_family_before_training(tmp_path, capsys):
    # the default method (TempFlow-GRPO) trains the flow model; an SD folder is refused before any training
    argv = ["demo", "--out", str(tmp_path), "--threads", "1", "--max-steps", "1", "--per-category", "1"]
    argv += ["--steps", "2", "--set", f"pretrained_model_name_or_path={SHIPPED_SD}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "`sd3` family" in err and "StableDiffusionPipeline" in err
    assert not (tmp_path / "run").exists()
