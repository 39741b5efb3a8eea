"""Deployment files under deploy/: every Kubernetes manifest (the base, each rendered overlay, the training
Job) validated against the Kubernetes 1.30 OpenAPI schemas that ``kubernetes-validate`` ships (offline,
strict: unknown fields fail), the compose file's structure, every ``CAE_*`` name and value against the
service's Settings, the probes against the health routes, and the Triton repository against its graphs."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import REPO

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"  # pinned: the schema set kubernetes-validate carries for this release
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
IMAGE_UID = 10001


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _kustomization(d: Path) -> dict[str, Any]:
    return yaml.safe_load((d / "kustomization.yaml").read_text())


# ---------------------------------------------------------------- kustomize, or its merge rules in Python
# Strategic-merge keys of the lists our patches touch (from the Kubernetes API's patchMergeKey); other
# lists are replaced, as strategic merge does for lists without a merge key.
MERGE_KEYS = {
    "containers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "env": "name",
    "ports": "containerPort",
}


def _merge(base: Any, patch: Any, key: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(out[k], v, k) if k in out else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        mk = MERGE_KEYS[key]
        merged = [dict(x) for x in base]
        new = []
        for item in patch:
            i = next((j for j, x in enumerate(merged) if x.get(mk) == item.get(mk)), None)
            if i is None:
                new.append(copy.deepcopy(item))
            else:
                merged[i] = _merge(merged[i], item)
        return new + merged  # kustomize puts a patch's new list items first
    return copy.deepcopy(patch)


def render_python(d: Path) -> list[dict[str, Any]]:
    """A kustomization rendered with the subset of kustomize this repository uses: resources (files or
    kustomization folders), strategic-merge patches by kind + name, and image tag overrides."""
    k = _kustomization(d)
    docs: list[dict[str, Any]] = []
    for r in k.get("resources", []):
        p = (d / r).resolve()
        docs += render_python(p) if p.is_dir() else _docs(p)
    by_key = {_key(x): i for i, x in enumerate(docs)}
    for patch in k.get("patches", []):
        for pd in _docs(d / patch["path"]):
            i = by_key[_key(pd)]
            docs[i] = _merge(docs[i], pd)
    for img in k.get("images", []):
        for doc in docs:
            for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                name, _, tag = c["image"].partition(":")
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img.get('newTag', tag)}"
    return docs


def _kustomize_cmd() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render(d: Path) -> list[dict[str, Any]]:
    """The overlay rendered by kustomize when installed (checked against the Python rendering), else by
    the Python rendering alone."""
    ours = render_python(d)
    cmd = _kustomize_cmd()
    if cmd is None:
        return ours
    out = subprocess.run([*cmd, str(d)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = [x for x in yaml.safe_load_all(out.stdout) if x]
    assert {_key(x): x for x in theirs} == {_key(x): x for x in ours}, (
        "the Python rendering drifted from kustomize"
    )
    return theirs


# ------------------------------------------------------------------------------------------ manifests
def all_manifests() -> list[tuple[str, dict[str, Any]]]:
    base = _kustomization(K8S / "base")
    files = [K8S / "base" / r for r in base["resources"]]
    for o in OVERLAYS:  # an overlay's own resources (its patches are partial: checked once rendered)
        files += [o / r for r in _kustomization(o).get("resources", []) if (o / r).is_file()]
    files += [K8S / "secret.example.yaml", *sorted((K8S / "training").glob("*.yaml"))]
    out = [(f"{p.relative_to(REPO)}:{i}", d) for p in sorted(set(files)) for i, d in enumerate(_docs(p))]
    out += [(f"{o.relative_to(REPO)} (rendered): {_key(d)}", d) for o in OVERLAYS for d in render(o)]
    return out


def test_every_manifest_is_valid_kubernetes() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install 'cae-service[dev]'")
    manifests = all_manifests()
    assert len(manifests) >= 15 and {o.name for o in OVERLAYS} >= {"gpu"}
    for where, doc in manifests:
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{where}: {e.message} at {'/'.join(map(str, e.path))}")


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _container(deploy: dict[str, Any]) -> dict[str, Any]:
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    return c


def _settings_fields() -> set[str]:
    from service.settings import Settings

    return {f"CAE_{name.upper()}" for name in Settings.model_fields}


def _check_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every CAE_* name is a Settings field, and the values parse (Settings reads them as the pod would)."""
    from service.settings import Settings

    unknown = sorted(set(env) - _settings_fields())
    assert not unknown, f"not service settings: {unknown}"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return Settings()


@pytest.mark.parametrize("variant", ["base", *(o.name for o in OVERLAYS)])
def test_deployment_contract(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(K8S / "base") if variant == "base" else render(K8S / "overlays" / variant)
    deploy, svc = _one(docs, "Deployment"), _one(docs, "Service")
    hpa, pdb, cm = (
        _one(docs, "HorizontalPodAutoscaler"),
        _one(docs, "PodDisruptionBudget"),
        _one(docs, "ConfigMap"),
    )
    pod = deploy["spec"]["template"]["spec"]
    c = _container(deploy)
    labels = deploy["spec"]["template"]["metadata"]["labels"]

    # the probes hit routes the service has
    from service.routers.health import router

    routes = {r.path for r in router.routes}
    assert (
        c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    )
    assert {c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]} <= routes

    # non-root as the image's user, read-only root with a writable /tmp
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"--uid {IMAGE_UID}" in dockerfile and pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert set(mounts.values()) <= set(volumes)
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"cpu", "memory"} <= set(
        c["resources"]["limits"]
    )

    # settings from the ConfigMap (valid names and values), API keys from a Secret
    assert [e["configMapRef"]["name"] for e in c["envFrom"]] == [cm["metadata"]["name"]]
    env = {e["name"]: e for e in c.get("env", [])}
    assert env["CAE_API_KEYS"]["valueFrom"]["secretKeyRef"]["key"] == "CAE_API_KEYS"
    assert "CAE_API_KEYS" not in cm["data"]
    settings = _check_settings(cm["data"], monkeypatch)
    assert {p["containerPort"] for p in c["ports"]} == {settings.port}
    assert settings.host == "0.0.0.0"
    if str(settings.model_dir) != "/app/models/default":  # else the bundle baked into the image
        assert any(str(settings.model_dir).startswith(m) for m in mounts), "CAE_MODEL_DIR is not mounted"
        assert next(m for m in c["volumeMounts"] if str(settings.model_dir).startswith(m["mountPath"]))[
            "readOnly"
        ]
    if settings.cache_dir is not None:
        assert str(settings.cache_dir) in mounts, "CAE_CACHE_DIR must be writable (a volume)"

    # Service, HPA and PDB point at these pods
    assert svc["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deploy["metadata"]["name"],
    }
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    if variant == "gpu":
        assert c["image"].endswith(":gpu")
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and settings.device == "cuda"
    else:
        assert "nvidia.com/gpu" not in c["resources"]["limits"]


def test_secret_example_matches_the_deployment() -> None:
    (secret,) = _docs(K8S / "secret.example.yaml")
    ref = _container(_docs(K8S / "base" / "deployment.yaml")[0])["env"][0]["valueFrom"]["secretKeyRef"]
    assert secret["metadata"]["name"] == ref["name"] and ref["key"] in secret["stringData"]
    assert (
        "secret.example.yaml" not in (K8S / "base" / "kustomization.yaml").read_text().split("resources:")[1]
    )


# ---------------------------------------------------------------------------------------------- compose
def test_compose_file(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    cae, prom = compose["services"]["cae"], compose["services"]["prometheus"]
    assert (DEPLOY / cae["build"]["context"] / cae["build"]["dockerfile"]).resolve() == REPO / "Dockerfile"
    assert cae["user"].split(":")[0] == str(IMAGE_UID) and cae["read_only"] is True and "/tmp" in cae["tmpfs"]
    env = {k: re.sub(r"^\$\{\w+:-(.*)\}$", r"\1", str(v)) for k, v in cae["environment"].items()}
    settings = _check_settings(env, monkeypatch)
    (bundle,) = [v for v in cae["volumes"] if v["target"] == str(settings.model_dir)]
    assert bundle["read_only"] is True
    default_src = re.sub(r"^\$\{\w+:-(.*)\}$", r"\1", bundle["source"])
    assert ((DEPLOY / default_src) / "spec.json").is_file()
    assert any(p.startswith(f"{settings.port}:") for p in cae["ports"])
    # Prometheus: its config mounted, scraping the service's /metrics, data on a named volume
    assert prom["depends_on"]["cae"]["condition"] == "service_healthy"
    mounts = {v["target"]: v for v in prom["volumes"] if isinstance(v, dict)}
    cfg_file = DEPLOY / mounts["/etc/prometheus/prometheus.yml"]["source"]
    named = [v.split(":")[0] for v in prom["volumes"] if isinstance(v, str)]
    assert named and set(named) <= set(compose["volumes"])
    scrape = yaml.safe_load(cfg_file.read_text())["scrape_configs"]
    (job,) = [j for j in scrape if j["job_name"] == "cae-service"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == [
        f"cae:{settings.port}"
    ]
    from service.routers.health import router

    assert "/metrics" in {r.path for r in router.routes}


def test_docker_image_stays_free_of_ray() -> None:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(d.startswith("ray") for d in extras["serve"]) and any(
        d.startswith("ray") for d in extras["batch"]
    )
    assert "['serve']" in (REPO / "Dockerfile").read_text()  # the image installs the serve extra only
    code = "import sys, service.app, service.batch; assert 'ray' not in sys.modules, 'ray imported'"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# --------------------------------------------------------------------------------------------- training
def test_training_job_manifest() -> None:
    docs = _docs(K8S / "training" / "pretrain-job.yaml")
    job, svc = _one(docs, "Job"), _one(docs, "Service")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert svc["spec"]["clusterIP"] == "None" and pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    (c,) = pod["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert int(env["NNODES"]) == spec["completions"]
    cmd = " ".join(c["args"])
    head = f"{job['metadata']['name']}-0.{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    assert f'--rdzv-endpoint "{head}"' in cmd and "--rdzv-backend c10d" in cmd
    run_args = cmd.split("training/run.py", 1)[1].replace('"', "").replace("$CONFIG", env["CONFIG"]).split()
    _check_run_args(run_args)
    out_dir = run_args[run_args.index("--output-dir") + 1]
    assert any(out_dir.startswith(m["mountPath"]) for m in c["volumeMounts"]), (
        "checkpoints must go to a volume"
    )


def _check_run_args(args: list[str]) -> None:
    """training/run.py accepts these arguments, resumes, and the preset exists."""
    from training.run import build_parser

    ns = build_parser().parse_args(args)
    assert ns.command == "pretrain" and ns.resume is True
    assert (REPO / "training" / "configs" / f"{ns.config}.yaml").is_file()


def test_slurm_script() -> None:
    script = DEPLOY / "slurm" / "pretrain.sbatch"
    bash = shutil.which("bash")
    if bash:
        out = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    text = script.read_text()
    assert (
        "#SBATCH --requeue" in text and "--rdzv-backend c10d" in text and '--nnodes "$SLURM_NNODES"' in text
    )
    assert '--rdzv-endpoint "$head:$RDZV_PORT"' in text
    tail = text.split("training/run.py", 1)[1].split("&\n")[0]
    args = [a for a in tail.replace("\\\n", " ").replace('"', "").split() if a != "$@"]
    args = [a.replace("$CONFIG", "cae_base_800e").replace("$OUTPUT_DIR", "runs/x") for a in args]
    args = [re.sub(r"\$\{SAVE_EVERY_STEPS:-(\d+)\}", r"\1", a) for a in args]
    _check_run_args(args)


# ----------------------------------------------------------------------------------------------- triton
def test_triton_repository_matches_its_graphs_and_the_client(tmp_path: Path) -> None:
    """Triton refuses a model whose config names, types or shapes disagree with the ONNX graph; and the
    client script must send what the config declares, preprocessed as the service does."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed (export extra)")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from export.triton import export_triton

    bundle = REPO / "models" / "default"
    np_types = {
        "tensor(float)": "TYPE_FP32",
        "tensor(bool)": "TYPE_BOOL",
        "tensor(float16)": "TYPE_FP16",
        "tensor(int64)": "TYPE_INT64",
    }
    for model_dir in export_triton(bundle, tmp_path / "repo", instance_kind="KIND_CPU"):
        cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert cfg.name == model_dir.name
        sess = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        for declared, actual in ((cfg.input, sess.get_inputs()), (cfg.output, sess.get_outputs())):
            assert [t.name for t in declared] == [t.name for t in actual]
            for t, a in zip(declared, actual, strict=True):
                assert model_config_pb2.DataType.Name(t.data_type) == np_types[a.type]
                # max_batch_size 0 (detect: one image per call): Triton's dims then include every axis
                shape = a.shape[1:] if cfg.max_batch_size > 0 else a.shape
                dims = [d if isinstance(d, int) else -1 for d in shape]
                # Triton's rule: a fixed graph dim must match; a dynamic one (-1) accepts any config dim
                assert len(t.dims) == len(dims) and all(
                    g in (-1, c) for c, g in zip(t.dims, dims, strict=True)
                ), f"{model_dir.name}/{t.name}: config {list(t.dims)} vs graph {dims}"

    import importlib.util

    import numpy as np
    from PIL import Image

    spec_ = importlib.util.spec_from_file_location("triton_client", DEPLOY / "triton_client.py")
    client = importlib.util.module_from_spec(spec_)
    assert spec_.loader is not None
    spec_.loader.exec_module(client)
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(buf, "PNG")
    x, task = client.preprocess(
        buf.getvalue(), tmp_path / "repo" / "cae_embed"
    )  # the spec Triton's dir carries
    cfg = text_format.Parse(
        (tmp_path / "repo" / "cae_embed" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert (
        x.dtype == np.float32
        and list(x.shape[1:]) == list(cfg.input[0].dims)
        and task["inputs"][0]["name"] == cfg.input[0].name
    )

    from service.bundle import load_bundle
    from service.imaging import Limits, Preprocessor

    b = load_bundle(bundle)
    np.testing.assert_array_equal(x[0], Preprocessor(b.image, Limits(50_000_000, 16))(buf.getvalue()))
