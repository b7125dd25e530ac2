import subprocess
import sys
import textwrap

import pytest

from visalign import cli


def test_help(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_subcommand_help(command, capsys):
    assert cli.main([command, "--help"]) == 0
    assert f"usage: visalign {command}" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert cli.main([]) != 0
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_unavailable_feature_says_so(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "train", ("visalign.no_such_feature:run", "not written yet"))
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert "not available yet" in err and "visalign.no_such_feature" in err
    assert cli.main(["train", "--help"]) == 0
    assert "not available yet" in " ".join(capsys.readouterr().out.split())  # argparse wraps the text


def test_feature_plugs_in(monkeypatch, tmp_path, capsys):
    (tmp_path / "shout_feature.py").write_text(
        textwrap.dedent(
            """
            def add_arguments(parser):
                parser.add_argument("word")
                parser.add_argument("--times", type=int, default=1)

            def run(args):
                print(args.word * args.times)
                return 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "demo", ("shout_feature:run", "shout a word"))
    assert cli.main(["demo", "ab", "--times", "2"]) == 3
    assert capsys.readouterr().out.strip() == "abab"
    assert cli.main(["demo", "--help"]) == 0
    assert "--times" in capsys.readouterr().out


def test_broken_feature_module_is_not_hidden(monkeypatch, tmp_path):
    (tmp_path / "broken_feature.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "demo", ("broken_feature:run", "broken"))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        cli.main(["demo"])


def test_help_imports_no_model_library():
    heavy = "{'diffusers', 'transformers', 'open_clip'}"
    code = f"import sys; from visalign.cli import main; main(['--help']); print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]")


def test_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, tmp_path, capsys):
    (tmp_path / "failing_feature.py").write_text(
        "def add_arguments(parser):\n    pass\n\n"
        "def run(args):\n    raise ValueError('`--n` must be positive; pass --n 4')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "demo", ("failing_feature:run", "fails"))
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err == "visalign demo: error: `--n` must be positive; pass --n 4\n"
    with pytest.raises(ValueError, match="--n"):
        cli.main(["demo", "--debug"])
    (tmp_path / "failing_feature.py").write_text(
        "def add_arguments(parser):\n    pass\n\ndef run(args):\n    raise RuntimeError('boom')\n"
    )
    import importlib

    importlib.reload(importlib.import_module("failing_feature"))
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err == "visalign demo: error: RuntimeError: boom (run again with --debug for the traceback)\n"


def test_a_repeated_library_warning_is_shown_once():
    import logging

    once = cli._Once()
    record = lambda msg, level=logging.WARNING: logging.LogRecord("diffusers", level, "", 0, msg, None, None)  # noqa: E731
    assert once.filter(record("slow path"))
    assert not once.filter(record("slow path"))
    assert once.filter(record("another"))
    assert once.filter(record("failed", logging.ERROR)) and once.filter(record("failed", logging.ERROR))
    assert once.filter(record("step", logging.INFO)) and once.filter(record("step", logging.INFO))


def test_train_finds_bundled_recipes_and_smoke_fits_every_one():
    from visalign.config import config_from_dict, config_to_dict, load_config
    from visalign.pipelines.train import METHODS, _resolve, bundled_configs, find_config, smoke_values
    from visalign.preflight import config_problems

    recipes = bundled_configs()
    assert find_config("world_dpo") == recipes["world_dpo"] == find_config("world_dpo.yaml")
    with pytest.raises(FileNotFoundError, match="bundled: .*world_flow_grpo"):
        find_config("world_dpp")
    method_of = {"dpo": "diffusion-dpo", "dro": "diffusion-dro", "prdp": "prdp", "reward": "reward"}
    method_of |= {"flow_grpo": "flow-grpo", "pref_grpo": "pref-grpo", "tempflow_grpo": "tempflow-grpo"}
    for name, path in recipes.items():
        method = next(m for key, m in sorted(method_of.items(), key=lambda kv: -len(kv[0])) if key in name)
        cls = _resolve(METHODS[method][0])
        config = load_config(cls, path)
        smoke = config_from_dict(cls, config_to_dict(config) | smoke_values(method, config))
        assert smoke.max_steps <= 2 and smoke.report_to == "none", name
        assert smoke.pretrained_model_name_or_path.startswith(("world:", "tiny:")), name
        missing = [thing for thing, _, problem in config_problems(smoke) if problem is not None]
        # Diffusion-DRO's experts are world renders that `run` writes before the preflight
        assert missing == (["path smoke_experts"] if method == "diffusion-dro" else []), (name, missing)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "diffusion-dpo", "--config", "tiny_dpo", "--set", "output_dir={out}/run", "use_lora=flase"],
        ["world", "train-base", "--out", "{out}", "--stages", "vae", "--set", "vae_steps=flase"],
    ],
)
def test_a_bad_value_is_an_error_naming_the_key_and_value_in_every_cli(argv, tmp_path, capsys):
    # both CLIs parse --set with visalign.config.parse_overrides: nothing is trained, the key and value are named
    key = argv[-1].partition("=")[0]
    assert cli.main([a.format(out=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert f"`{key}`" in err and "'flase'" in err
    assert not any(tmp_path.iterdir())


def test_world_train_base_reads_a_strict_boolean_field_like_train(monkeypatch, capsys):
    # TrainBaseConfig has no boolean of its own: a subclass shows the world CLI's --set is the one strict parser
    from dataclasses import dataclass, field

    import visalign.world.train as world_train

    @dataclass
    class WithFlag(world_train.TrainBaseConfig):
        flag: bool = field(default=True, metadata={"help": "a boolean"})

    seen = []
    monkeypatch.setattr(world_train, "TrainBaseConfig", WithFlag)
    monkeypatch.setattr(world_train, "train_base", lambda cfg, stages: seen.append(cfg) or {})
    assert cli.main(["world", "train-base", "--set", "flag=no", "seed=3"]) == 0
    assert seen[0].flag is False and seen[0].seed == 3
    assert cli.main(["world", "train-base", "--set", "flag=flase"]) == 2
    assert "`flag` must be a boolean (true/false, yes/no or 1/0), got 'flase'" in capsys.readouterr().err
    assert len(seen) == 1


def test_every_train_base_field_has_help():
    import dataclasses

    from visalign.world.train import TrainBaseConfig

    assert all(f.metadata.get("help") for f in dataclasses.fields(TrainBaseConfig))
    with pytest.raises(ValueError, match="`vae_steps` must be > 0"):
        TrainBaseConfig(vae_steps=0)


def test_public_names_are_listed_documented_and_shown_by_help():
    import pydoc

    import visalign

    entry_points = {"load_reward", "list_rewards", "load_generator", "RewardModel", "RewardOutput", "load_config"}
    assert entry_points <= set(visalign.__all__)
    assert len(set(visalign.__all__)) == len(visalign.__all__)
    page = pydoc.render_doc(visalign, renderer=pydoc.plaintext)
    for name in visalign.__all__:
        obj = getattr(visalign, name)
        doc = obj.__doc__ or ""  # its own docstring: not inherited, not a dataclass's generated signature
        assert len(doc.strip()) > 20 and not doc.startswith(f"{name}("), name
        assert f"`{name}" in visalign.__doc__, name  # the package docstring says what each is for
        assert f"{name}(" in page or f"class {name}" in page, name  # help(visalign) lists it
    with pytest.raises(AttributeError, match="no_such_name"):
        getattr(visalign, "no_such_name")  # noqa: B009
