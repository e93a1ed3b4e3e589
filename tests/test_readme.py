"""The README's Python examples run as printed, the quickstart notebook runs top to bottom, and the README's test
command is the one CI runs."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def readme_block(marker: str) -> str:
    """The README's ```python block containing marker."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return next(b for b in blocks if marker in b)


def test_readme_api_example_runs(capsys):
    exec(compile(readme_block("turbojax.WanDiT(cfg"), "README.md", "exec"), {})
    assert "(1, 16, 3, 4, 6) [988. 932. 852. 608.]" in capsys.readouterr().out


def test_readme_pipeline_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_block("T2VPipeline.tiny"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "(2, 9, 48, 80, 3) uint8" in out
    assert "['diffusion', 'text_encode', 'vae_decode', 'write']" in out
    assert (tmp_path / "out" / "fox.mp4").is_file()


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the notebook writes into out/
    nb = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    scope: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), scope)
    assert scope["video"].frames.shape == (2, 9, 48, 80, 3)
    assert scope["clip"].frames.shape == (2, 5, 48, 64, 3)
    assert scope["clip"].experts == ("high", "high", "low", "low")
    assert scope["strip"].size == (160, 5 * 48)  # every other frame of both samples
    assert "[988. 932. 852. 608.]" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"quickstart_t2v.mp4", "quickstart_i2v.mp4",
                                                              "quickstart_input.png"}
