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
