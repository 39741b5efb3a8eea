"""What a new user reads first: the CLIs' listings and help, and the README's two commands."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from tests.helpers import REPO


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_presets_lists_pretraining_and_dense_presets() -> None:
    r = _run("training/run.py", "presets")
    assert r.returncode == 0, r.stderr
    names = {line.strip() for line in r.stdout.splitlines() if line.startswith("  ")}
    assert {"fmnist_cae", "cae_base_800e", "fmnist_scenes_upernet", "fmnist_scenes_maskrcnn"} <= names


@pytest.mark.parametrize(
    "name,task,head",
    [
        ("fmnist_scenes_upernet", "segment", "upernet"),
        ("training/configs/dense/fmnist_scenes_maskrcnn.yaml", "detect", "maskrcnn"),
    ],
)
def test_presets_prints_a_dense_preset_resolved(name: str, task: str, head: str) -> None:
    r = _run("training/run.py", "presets", name)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["task"] == task and cfg["model"]["head"] == head
    assert {"optim", "data", "runtime"} <= set(cfg)  # resolved: every section with its defaults


def test_presets_pretraining_yaml_path_and_unknown_name() -> None:
    r = _run("training/run.py", "presets", "training/configs/fmnist_cae.yaml")
    assert r.returncode == 0 and yaml.safe_load(r.stdout)["optim"]["epochs"] >= 1
    bad = _run("training/run.py", "presets", "no_such_preset")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "no_such_preset" in bad.stderr and "fmnist_scenes_upernet" in bad.stderr


def test_export_help_is_current() -> None:
    r = _run("-m", "export", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "later" not in text
    for word in ("ONNX", "TensorRT", "Triton"):
        assert word in text


def _readme_command(n: int) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"\*\*{n}\..*?```bash\n(.*?)\n```", text, re.S)
    assert m, f"README command {n} not found"
    return m.group(1)


def test_readme_command_1_serves_without_the_dataset_or_torch() -> None:
    """Command 1 runs the service: it must not install Fashion-MNIST (the service never reads it), and
    nothing optional may sit in its `&&` chain where a failure stops the whole command."""
    cmd = _readme_command(1)
    assert "dataset-fashion-mnist" not in cmd and "apt-get" not in cmd
    assert "torch" not in cmd and "'.[serve]'" in cmd  # the service's extra: no torch
    assert cmd.rstrip().endswith("python -m service")
