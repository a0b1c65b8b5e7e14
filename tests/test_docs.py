"""The manual and the code agree: every knob and every CLI command is documented."""
from pathlib import Path

from cubefit_mpi.cli.main import build_parser
from cubefit_mpi.config.knobs import PREDECESSOR_KNOBS, knob_table

ROOT = Path(__file__).resolve().parents[1]
MANUAL = (ROOT / "docs" / "CubeFit.md").read_text()


def test_every_knob_in_the_manual_with_its_default():
    for env, default, _ in knob_table():
        shown = {True: "1", False: "0"}.get(default, default) if isinstance(default, bool) else default
        assert f"| `{env}` | `{shown}` |" in MANUAL, env


def test_every_predecessor_knob_in_the_manual_with_its_replacement():
    for env, note in PREDECESSOR_KNOBS.items():
        assert f"| `{env}` | {note} |" in MANUAL, env


def test_every_command_in_the_manual_and_readme():
    readme = (ROOT / "README.md").read_text()
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in [a.dest for a in sub._choices_actions]:         # the listed (non-hidden) commands
        assert f"`{name}`" in MANUAL, name
        assert f"`{name}" in readme, name
