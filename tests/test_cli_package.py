"""genfw/cli/ is a package of command modules: `--help` stays light and lists the commands in order."""

import re
import subprocess
import sys

from typer.testing import CliRunner

from genfw.cli import _ORDER, app

HEAVY = ("torch", "genfw.api", "genfw.pipeline", "genfw.registry", "genfw.config")


def test_help_lists_the_commands_in_their_order():
    text = CliRunner().invoke(app, ["--help"], terminal_width=200).output
    listed = re.findall(r"^│ ([a-z][a-z-]*)\s", text, flags=re.M)
    assert listed == [*_ORDER, "recipes"]


def test_help_of_every_command_imports_nothing_heavy():
    # `convert --help` is left out: it lists the converters registered now, so it loads the registry
    commands = [[], *([c] for c in _ORDER if c != "convert"), ["recipes"], ["recipes", "list"], ["recipes", "copy"]]
    code = (f"import sys\nfrom genfw.cli import app\nfor argv in {commands!r}:\n"
            "    try:\n        app([*argv, '--help'], prog_name='genfw')\n    except SystemExit as e:\n"
            "        assert not e.code, argv\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
