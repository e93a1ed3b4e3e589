"""The README's self-contained Python example runs as printed, and its test command is the one CI runs."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_readme_api_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert "(1, 16, 3, 4, 6) [988. 932. 852. 608.]" in capsys.readouterr().out


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_quickstart_notebook_runs_top_to_bottom(capsys):
    nb = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    scope: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), scope)
    assert scope["latents"].shape == (1, 16, 3, 4, 6)
    assert "[988. 932. 852. 608.]" in capsys.readouterr().out
