"""The layers (`DESIGN.md`): core `visalign/` never imports `pipelines/`, `benchmarks/` or `reward_models/` except
through the registries (names in strings, imported on use); rewards never import trainers.

Each import check runs in a fresh interpreter, so a module imported by an earlier test cannot hide an import.
"""

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import visalign

CORE = Path(visalign.__file__).parent  # the mapped packages (pipelines, benchmarks, ...) live in other folders
UPPER = ("visalign.pipelines", "visalign.benchmarks", "visalign.reward_models")
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "open_clip", "numpy")


def core_modules() -> list[str]:
    """Every module of the core folder, as a dotted name (`visalign`, `visalign.engine`, `visalign.world.models`)."""
    names = []
    for path in sorted(CORE.rglob("*.py")):
        parts = path.relative_to(CORE).with_suffix("").parts
        names.append(".".join(("visalign",) + (parts[:-1] if parts[-1] == "__init__" else parts)))
    return names


PROBE = textwrap.dedent(
    """
    import contextlib, importlib, io, json, sys
    UPPER, HEAVY = {upper!r}, {heavy!r}
    upper = lambda: sorted(m for m in sys.modules if m.startswith(UPPER))
    heavy = lambda: sorted({{m.split(".")[0] for m in sys.modules}} & set(HEAVY))
    out = {{}}
    if {cli_help!r}:
        from visalign.cli import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
            main(["--help"])
        out["visalign --help"] = {{"upper": upper(), "heavy": heavy()}}
    for name in {modules!r}:
        try:
            importlib.import_module(name)
        except Exception as e:
            out[name] = {{"error": f"{{type(e).__name__}}: {{e}}"}}
        else:
            out[name] = {{"upper": upper(), "heavy": heavy()}}
    print(json.dumps(out))
    """
)


def probe(modules: list[str], cli_help: bool = False) -> dict[str, dict]:
    """Import `modules` one after another in a fresh interpreter (after `visalign --help` when `cli_help`); for each,
    the upper-layer modules and heavy libraries loaded so far (cumulative), or the import error."""
    code = PROBE.format(upper=UPPER, heavy=HEAVY, cli_help=cli_help, modules=modules)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_core_module_list_is_complete():
    names = core_modules()
    for name in ("visalign", "visalign.engine", "visalign.html", "visalign.monitor", "visalign.lifecycle"):
        assert name in names
    assert "visalign.world.rewards" in names and not any(n.startswith(UPPER) for n in names)


def test_the_probe_sees_an_upper_layer_import():
    """The check below can fail: importing a benchmark module is reported."""
    seen = probe(["visalign.benchmarks.report"])["visalign.benchmarks.report"]
    assert "visalign.benchmarks.report" in seen["upper"] and "visalign.benchmarks.scoring" not in seen["upper"]


def test_importing_any_core_module_imports_no_upper_layer():
    results = probe(core_modules(), cli_help=True)
    assert results.pop("visalign --help") == {"upper": [], "heavy": []}  # the CLI's help stays light
    errors = {name: r["error"] for name, r in results.items() if "error" in r}
    assert not errors
    first = next(((name, r["upper"]) for name, r in results.items() if r["upper"]), None)
    assert first is None, f"importing {first[0]} loaded {first[1]}"


def upper_imports(source: str, where: str) -> list[str]:
    """The `import` statements of `source`, anywhere (function bodies too), that name an upper layer."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{where}:{node.lineno} imports {n}" for n in names if n.startswith(UPPER)]
    return found


def test_the_static_check_sees_an_import_inside_a_function():
    source = "import json\n\ndef f():\n    from visalign.benchmarks.report import line_plot\n"
    source += "    import visalign.pipelines\n"
    assert upper_imports(source, "m.py") == [
        "m.py:4 imports visalign.benchmarks.report",
        "m.py:5 imports visalign.pipelines",
    ]
    assert upper_imports('REGISTRY = {"x": "visalign.pipelines.train:run"}\n', "m.py") == []  # a registry entry


def test_core_code_reaches_upper_layers_only_through_registries():
    """No core function imports an upper layer when called either (a registry names it in a string instead)."""
    found = [
        hit
        for path in sorted(CORE.rglob("*.py"))
        for hit in upper_imports(path.read_text(encoding="utf-8"), str(path.relative_to(CORE.parent)))
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("module", ["visalign.reward_models.pairwise"])
def test_a_pairwise_judge_imports_no_trainer(module):
    """Loading a judge must not pull in the training stack: no `visalign.pipelines`, accelerate or peft."""
    seen = probe([module])[module]
    assert "error" not in seen, seen
    assert not [m for m in seen["upper"] if m.startswith("visalign.pipelines")]
    assert not {"accelerate", "peft"} & set(seen["heavy"])
