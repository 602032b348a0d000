"""The README says what the code does: its signatures, its command line and its examples.

A parameter added to a probe, a flag added to a command or a renamed function that the
README does not follow fails here, as does an example that no longer runs.
"""

import ast
import importlib.util
import inspect
import json
import re
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import probescope as ps
from probescope.cli import build_parser, main
from tests.conftest import torchrun

README = (Path(__file__).parents[1] / "README.md").read_text()

#: README: "Every probe takes `name=` and `schedule=`", said once for all of them.
EVERY_PROBE = ("name", "schedule")


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end >= 0 else None]


def _documented_signatures() -> dict[str, str]:
    """Name -> the argument list as the README writes it (bold probe signatures, the Monitor's)."""
    found = {m[1]: m[2] for m in re.finditer(r"\*\*`([A-Za-z_]+)\((.*?)\)`\*\*", README, re.S)}
    monitor = re.search(r"`Monitor\((model, probes.*?)\)`", _section("The Monitor"), re.S)
    assert monitor is not None, "the Monitor's signature is no longer at the top of its section"
    found["Monitor"] = monitor[1]
    return found


SIGNATURES = _documented_signatures()


def _parameters(arguments: str) -> list[tuple[str, str, object]]:
    """(name, kind, default) of a written argument list, parsed as Python."""
    spec = ast.parse(f"def f({' '.join(arguments.split())}): pass").body[0].args
    out = []
    positional = spec.posonlyargs + spec.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(spec.defaults)) + spec.defaults
    for arg, default in zip(positional, defaults, strict=True):
        value = default if default is inspect.Parameter.empty else ast.literal_eval(default)
        out.append((arg.arg, "positional", value))
    for arg, default in zip(spec.kwonlyargs, spec.kw_defaults, strict=True):
        value = inspect.Parameter.empty if default is None else ast.literal_eval(default)
        out.append((arg.arg, "keyword", value))
    return out


def _kind(parameter: inspect.Parameter) -> str:
    return "keyword" if parameter.kind is inspect.Parameter.KEYWORD_ONLY else "positional"


def test_the_readme_documents_the_probes_and_the_monitor():
    probes = {name for name in ps.__all__ if name.endswith("Probe") and name != "Probe"}
    assert probes <= set(SIGNATURES), f"probes without a signature in the README: {probes - set(SIGNATURES)}"
    assert "Every probe takes `name=` and `schedule=`" in README


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_a_documented_signature_is_the_real_one(name):
    """Names in order, positional or keyword-only, and defaults, as the code has them."""
    documented = _parameters(SIGNATURES[name])
    real = [
        (p.name, _kind(p), p.default)
        for p in inspect.signature(getattr(ps, name)).parameters.values()
        if not (name.endswith("Probe") and p.name in EVERY_PROBE)
    ]
    assert [d[:2] for d in documented] == [r[:2] for r in real]
    assert documented == real


def _kernel_rows() -> list[tuple[str, str]]:
    """(op, written arguments) of every call in the Kernels section's table."""
    rows = re.findall(r"^\| (`.*?`) \|", _section("Kernels"), re.M)
    return [(m[1], m[2]) for row in rows for m in re.finditer(r"`(\w+)\((.*?)\)`", row)]


def test_the_kernels_table_names_real_ops_and_their_arguments():
    import probescope.kernels as kernels

    rows = _kernel_rows()
    assert len(rows) == 9
    for op, written in rows:
        parameters = inspect.signature(getattr(kernels, op)).parameters
        positional = [p for p in parameters.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        arguments = [a.strip() for a in written.split(",") if a.strip() not in ("", "...")]
        keywords = [a.split("=")[0] for a in arguments if "=" in a]
        assert set(keywords) <= set(parameters), (op, keywords)
        assert len(arguments) - len(keywords) <= len(positional), op


def _command_bullets() -> dict[str, str]:
    """Command -> the text of its bullets in "Command line" (a command can have two)."""
    bullets: dict[str, str] = {}
    for bullet in re.split(r"\n- ", _section("Command line"))[1:]:
        for m in re.finditer(r"`probescope (\w+)(.*?)`", bullet, re.S):
            bullets[m[1]] = bullets.get(m[1], "") + " " + m[2]
    return bullets


COMMANDS = build_parser()._subparsers._group_actions[0].choices


def test_the_readme_documents_every_command():
    assert set(_command_bullets()) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_documented_command_has_the_real_flags_and_choices(command):
    text = _command_bullets()[command]
    documented = set(re.findall(r"(--[a-z][a-z-]*)", text))
    options = {
        option: action
        for action in COMMANDS[command]._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
    assert documented == set(options), "README lacks / has extra: " + str(
        (set(options) - documented, documented - set(options))
    )
    written: dict[str, set[str]] = {}  # `--flag a|b|c` (or one value) wherever the command is
    for flag, values in re.findall(r"(--[a-z][a-z-]*) ([a-z0-9]+(?:\|[a-z0-9]+)*)\b", text):
        written.setdefault(flag, set()).update(values.split("|"))
    for flag, action in options.items():
        if action.choices is not None:  # a list the parser checks
            assert written.get(flag) == {str(c) for c in action.choices}, flag
    positional = [a for a in COMMANDS[command]._actions if not a.option_strings and a.choices]
    for action in positional:  # `probescope zoo mlp|transformer|...`
        assert set(action.choices) <= set(re.findall(r"\w+", text.split("--")[0])), action.dest


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def _block(first_line: str) -> str:
    (block,) = [b for b in _python_blocks() if b.startswith(first_line)]
    return block


def _run_block(folder: Path, first_line: str, name: str, env: dict[str, str] | None = None) -> dict:
    """Run the README's block that starts with ``first_line`` as the script ``name`` in
    ``folder`` (its working directory), as a user would; its globals at the end."""
    script = folder / name
    script.write_text(_block(first_line))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for key, value in (env or {}).items():
            patch.setenv(key, value)  # put back after
        return runpy.run_path(str(script), run_name="__main__")


@pytest.fixture(scope="module")
def plain_loop_run(tmp_path_factory):
    """The README's plain loop, run as written, then the two commands it says to run next."""
    folder = tmp_path_factory.mktemp("readme")
    _run_block(folder, "import torch, probescope as ps\n\nx, y = ", "plain_loop.py")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        commands = re.search(r"Then `probescope (export .*?)` and\s+`probescope (info .*?)`", README)
        assert commands is not None, "the commands after the plain loop moved"
        for command in commands.groups():
            assert main([*command.split(), *(["--quiet"] if command.startswith("export") else [])]) == 0
    return folder / "runs" / "mine"


def test_the_plain_loop_example_runs_and_records_its_probes(plain_loop_run):
    run = ps.open_run(plain_loop_run)
    assert run.meta["status"] == "finished"
    assert list(run.meta["probes"]) == ["grid", "prediction", "loss"]
    assert run.probe("loss").frame(-1).step == 10 * 32  # ten epochs of 32 batches
    exports = plain_loop_run / "exports"
    assert (exports / "grid.mp4").stat().st_size > 0 and (exports / "grid.gif").stat().st_size > 0


def test_the_open_run_and_spec_examples_run_on_it(plain_loop_run, tmp_path):
    run_dir = tmp_path / "runs"
    shutil.copytree(plain_loop_run, run_dir / "demo-blobs7")  # the paths the examples name
    shutil.copytree(plain_loop_run, run_dir / "seed0")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        space = {"ps": ps}
        exec(_block('run = ps.open_run("runs/demo-blobs7")'), space)
        assert space["last"].step == space["run"].probe("grid").frame(-1).step
        assert space["last"].data["rgba"].shape[-1] == 4
        exec(_block('probes = ps.load_probes("runs/seed0")'), space)
    assert (tmp_path / "probes" / "blobs.json").exists()
    grid = space["probes"][0]
    assert isinstance(grid, ps.GridProbe) and grid.config()["resolution"] == [512, 512]


def test_the_keras_example_runs(tmp_path):
    if importlib.util.find_spec("keras") is None:
        pytest.skip("needs keras (the keras extra)")
    # The example sets KERAS_BACKEND too; setting it here puts it back after.
    _run_block(tmp_path, "import os", "keras_example.py", env={"KERAS_BACKEND": "torch"})
    run = ps.open_run(tmp_path / "runs" / "keras")
    assert run.meta["status"] == "finished"
    assert list(run.meta["probes"]) == ["curve", "loss"]
    assert run.probe("curve").frame(-1).step == 20 * 29  # 900 training samples in batches of 32


def test_the_probe_of_your_own_example_runs_and_its_frames_are_right(tmp_path, capsys):
    space = _run_block(tmp_path, "import torch, probescope as ps\n\n\nclass Margins(ps.Probe):", "margins.py")
    run = ps.open_run(tmp_path / "runs" / "margins")
    probe = run.probe("margins")
    assert run.meta["status"] == "finished" and probe.kind == "margins"
    steps = [probe.frame(i).step for i in range(len(probe))]  # a frame due while one runs is skipped
    assert steps[0] == 0 and steps[-1] == 200 and set(steps) <= set(range(0, 201, 20)) and len(steps) > 5
    model, x, y = space["model"], space["x"][:64], space["y"][:64]
    with torch.no_grad():
        logits = model(x)
    true = logits[torch.arange(64), y]
    other = torch.stack([torch.cat([row[:c], row[c + 1 :]]).max() for row, c in zip(logits, y, strict=True)])
    last = probe.frame(-1).data
    np.testing.assert_allclose(last["margins"], (true - other).numpy(), rtol=1e-5, atol=1e-6)
    assert int(last["wrong"]) == int((true < other).sum())
    assert capsys.readouterr().out.strip() == str(last["wrong"])
    # as the README says, drawn as the margins' histogram, how many are wrong in the caption
    from probescope.figures import plot_frame

    ax = plot_frame(probe).axes[0]
    assert ax.get_xlabel() == "margins" and ax.get_ylabel() == "count"
    assert ax.get_title() == f"margins (64)  ·  wrong {int(last['wrong'])}"


def test_the_transformers_example_runs(tmp_path):
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("needs transformers (the transformers extra)")
    _run_block(tmp_path, "import torch, probescope as ps\nfrom transformers", "transformers_example.py")
    run = ps.open_run(tmp_path / "runs" / "bert")
    assert run.meta["status"] == "finished" and run.meta["summary"]["steps"] == 200
    assert list(run.meta["probes"]) == ["prediction", "stats", "loss", "checkpoint"]
    for name, counters in run.meta["summary"]["probes"].items():
        assert counters["failed"] == 0, (name, counters)
    last = run.probe("loss").frame(-1).data
    assert last["series/train_loss/steps"].tolist() == list(range(1, 201))
    assert last["series/valid_loss/steps"].tolist() == [50, 100, 150, 200]
    index = json.loads((tmp_path / "runs" / "bert" / "checkpoints" / "checkpoints.json").read_text())
    assert index["best"]["step"] in (50, 100, 150, 200)


def test_the_fsdp_example_runs_on_two_ranks(tmp_path):
    script = tmp_path / "fsdp_example.py"
    script.write_text(_block("# torchrun --nproc_per_node 2 fsdp_example.py"))
    done, folder = torchrun(script)
    assert done.returncode == 0, done.stderr[-3000:]
    run = ps.open_run(folder / "runs" / "fsdp")
    assert run.meta["status"] == "finished" and run.meta["summary"]["steps"] == 200
    assert run.meta["model"]["sharded"] == "module '(root)' was sharded by fully_shard (FSDP2)"
    for name, counters in run.meta["summary"]["probes"].items():
        assert counters["failed"] == 0, (name, counters)
    steps = [run.probe("grid").frame(i).step for i in range(len(run.probe("grid")))]
    assert steps[0] == 0 and steps[-1] == 200 and set(steps) <= set(range(0, 201, 20))
    # model.pt, gathered whole at close, loads into the model as defined; its map is the last frame.
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 3),
    )
    model.load_state_dict(torch.load(folder / "runs" / "fsdp" / "model.pt"))
    last = run.probe("grid").frame(-1)
    probe = ps.load_probes(folder / "runs" / "fsdp")[0]
    probe.attach(model)
    with torch.no_grad():
        again = probe.evaluate(model, ps.ProbeContext(200, 0))
    np.testing.assert_allclose(np.asarray(again["probs"]), last.data["probs"], rtol=0, atol=1e-5)
