"""The README's five-minute tour, run end to end as it is written (serve, embed with curl and with the
client, a reconstruction, retrain, export, serve the new bundle), with free ports and a tiny model on
generated images instead of 60 Fashion-MNIST steps of the real one. Nothing is written into the repo."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import REPO, free_port, make_image_folder

TINY_MODEL = (
    "model.overrides={img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2,"
    " decoder_embed_dim: 32, decoder_num_heads: 2, regressor_depth: 1, decoder_depth: 1, target: pixel,"
    " drop_path_rate: 0.0}"
)
TINY_SETS = [
    TINY_MODEL,
    "data.num_workers=0",
    "data.min_mask_patches_per_block=2",
    "optim.batch_size=16",
    "runtime.precision=fp32",
    "runtime.device=cpu",
    "runtime.tensorboard=false",
]


def tour_block() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- tour -->\s*```bash\n(.*?)\n```\s*<!-- /tour -->", text, re.S)
    assert m, "README has no tour block"
    return m.group(1)


def test_tour_block_is_what_the_readme_promises() -> None:
    block = tour_block()
    for step in ("python -m service --port 8000 &", "CAEClient", "/reconstruct?", "training/run.py pretrain",
                 "python -m export onnx", "--model-dir tour/bundle"):  # fmt: skip
        assert step in block, step
    assert "runs/" not in block and "pip install" not in block  # the tour writes to tour/ only


@pytest.mark.slow
def test_readme_tour_runs_end_to_end(tmp_path: Path) -> None:
    work = tmp_path / "checkout"
    work.mkdir()
    for name in ("training", "export", "service", "models", "docs"):  # read-only views of the repo
        (work / name).symlink_to(REPO / name)
    images = make_image_folder(tmp_path / "images", per_class=12, size=20)
    p1, p2 = free_port(), free_port()
    script = tour_block().replace("8000", str(p1)).replace("8001", str(p2))
    tiny = " ".join(f"--set {shlex.quote(s)}" for s in [*TINY_SETS, f"data.dataset=imagefolder:{images}"])
    assert "--config fmnist_cae --set runtime.max_steps=60" in script
    script = script.replace("--config fmnist_cae --set runtime.max_steps=60",
                            f"--config fmnist_cae {tiny} --set runtime.max_steps=3")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAE_")}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", PYTHONPATH=str(work),
               CAE_ACCESS_LOG="false", CAE_BACKEND="onnxruntime")  # fmt: skip
    proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the script's process group: servers it left behind, if any
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, out[-6000:]
    embeds = re.findall(r'\{"model":"([^"]+)","pooling":"\w[^"]*".*?"shape":\[1,(\d+)\]', out)
    assert len(embeds) == 2, out[-4000:]
    (default_id, default_dim), (tour_id, tour_dim) = embeds
    spec = json.loads((work / "tour" / "bundle" / "spec.json").read_text())
    assert tour_id == spec["model"]["id"] != default_id and int(tour_dim) == 32
    assert f"(1, {default_dim})" in out  # the client's embedding of the same image
    rec = Image.open(work / "tour" / "rec.png")
    assert rec.format == "PNG" and rec.size[0] == 3 * rec.size[1]  # original | masked | reconstruction
    assert (work / "tour" / "run" / "model.safetensors").is_file()
    assert not any(p.name == "tour" for p in REPO.iterdir())
