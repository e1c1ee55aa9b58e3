"""train.py --model FILE.py:Class: the user's own nn.Module in the playground's loop."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MLP = '''
from torch import nn


class Net(nn.Module):
    """An MLP: no conv layer, no `features` or `classifier` parts."""

    def __init__(self, num_classes, in_channels, image_size, dropout):
        super().__init__()
        self.flat = nn.Flatten()
        self.hidden = nn.Linear(in_channels * image_size * image_size, 32)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.out(self.drop(self.act(self.hidden(self.flat(x)))))


def tiny():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
'''


def train(tmp_path: Path, *options: str, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--db", f"sqlite:///{tmp_path / 'u.db'}",
         "--dataset", "digits", "--no-progress", "--checkpoint-dir", str(tmp_path / "ck"),
         "--log-every", "10", *options],
        cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env,
    )


def test_a_model_from_a_file_trains_and_is_watched(tmp_path: Path) -> None:
    (tmp_path / "my_net.py").write_text(MLP)
    result = train(tmp_path, "--model", f"{tmp_path / 'my_net.py'}:Net", "--max-steps", "30",
                   "--dropout", "20")
    assert result.returncode == 0, result.stderr[-2000:]
    con = sqlite3.connect(tmp_path / "u.db")
    assert con.execute("SELECT status, model_name FROM runs").fetchone() == (
        "finished", f"{tmp_path / 'my_net.py'}:Net")
    steps = [r[0] for r in con.execute("SELECT step FROM statistics ORDER BY step")]
    assert steps[0] == 0 and steps[-1] == 30 and {10, 20} <= set(steps)  # + an epoch's end
    layers = {r[0] for r in con.execute("SELECT DISTINCT layer_name FROM layer_statistics")}
    assert layers == {"hidden", "out"}
    assert con.execute("SELECT dropout FROM parameters").fetchone() == (20,)


def test_a_factory_from_a_module_on_the_path_trains(tmp_path: Path) -> None:
    (tmp_path / "my_net.py").write_text(MLP)  # importable as my_net, as a package would be
    result = train(tmp_path, "--model", "my_net:tiny", "--max-steps", "10",
                   env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]


def test_bad_model_specs_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "my_net.py").write_text(MLP)
    form = train(tmp_path, "--model", "not a spec")
    assert form.returncode == 2 and "path/to/file.py:ClassName" in form.stderr
    for spec, words in ((f"{tmp_path / 'none.py'}:Net", "there is no file"),
                        (f"{tmp_path / 'my_net.py'}:Missing", "has no Missing"),
                        ("no_such_module_here:Net", "ModuleNotFoundError")):
        result = train(tmp_path, "--model", spec, "--max-steps", "5")
        assert result.returncode == 1, (spec, result.stderr[-1500:])
        assert words in result.stderr and "Traceback" not in result.stderr


def test_a_resume_does_not_import_a_model_path_read_from_the_database(tmp_path: Path) -> None:
    """runs.config is writable by any SQL client: a module path in it is never imported.
    Resuming a run of the user's own model needs the same --model on the command line."""
    (tmp_path / "my_net.py").write_text(MLP)
    spec = f"{tmp_path / 'my_net.py'}:Net"
    assert train(tmp_path, "--model", spec, "--max-steps", "10").returncode == 0
    refused = train(tmp_path, "--resume", "1", "--max-steps", "20")
    assert refused.returncode == 1 and "saved options are not valid: model=" in refused.stderr
    resumed = train(tmp_path, "--resume", "1", "--model", spec, "--max-steps", "20")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    con = sqlite3.connect(tmp_path / "u.db")
    assert con.execute("SELECT max(step), count(DISTINCT run_id) FROM statistics").fetchone() \
        == (20, 1)
