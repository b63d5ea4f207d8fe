"""infra/ checked offline, as far as a cluster's own checks go without a cluster:

- the RayCluster against KubeRay's v1 CRD schema (vendored, tests/data/README.md) with unknown fields refused, as
  `kubectl apply` refuses them, and its pod templates, the work pool's namespace/RBAC manifest and the flow-run Job
  that the base job template renders for every deployment against Kubernetes' own schemas (kubernetes-validate);
- the Dockerfile with hadolint, and that it installs what KubeRay's probes run;
- the object store fits /dev/shm, and evaluation pods request what the CIFAR-10 L2-SVM holds;
- `prefect deploy --prefect-file infra/kubernetes/prefect.yaml` against a `kubernetes` work pool on a real server.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prefect_server import BIN, REPO, prefect, prefect_server  # noqa: F401  (fixture)

K8S = REPO / "infra" / "kubernetes"
CRD_SCHEMA = Path(__file__).parent / "data" / "kuberay-v1.4.2-raycluster-v1.schema.json"
K8S_VERSION = "1.29.0"  # the oldest Kubernetes the manifests are meant for: newer fields would fail here


def load(path: Path) -> list[dict]:
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def raycluster() -> dict:
    (rc,) = load(K8S / "raycluster.yaml")
    return rc


def deployments() -> dict[str, dict]:
    return {d["name"]: d for d in load(K8S / "prefect.yaml")[0]["deployments"]}


def quantity(q: str | int) -> float:
    """A Kubernetes quantity ("44Gi", "500m", "8") as a number."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q)).groups()
    return float(number) * units.get(unit, 1)


# --- RayCluster against KubeRay's CRD ---------------------------------------------------------------------------


def refuse_unknown_fields(schema):
    """The schema with `additionalProperties: false` on every object that lists its properties: `kubectl apply`
    (strict field validation, the default since Kubernetes 1.27) rejects unknown fields, plain JSON Schema does not."""
    if isinstance(schema, list):
        return [refuse_unknown_fields(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in ("enum", "default", "properties") else refuse_unknown_fields(v) for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {name: refuse_unknown_fields(s) for name, s in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@cache
def crd_validator() -> jsonschema.Validator:
    schema = refuse_unknown_fields(json.loads(CRD_SCHEMA.read_text()))
    return jsonschema.Draft4Validator(schema)  # OpenAPI 3.0 schemas are JSON Schema draft 4 plus extensions


def crd_errors(rc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator().iter_errors(rc)]


def test_raycluster_validates_against_kuberay_v1_crd():
    rc = raycluster()
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert crd_errors(rc) == []


def _typo(rc):
    rc["spec"]["headGroupSpec"]["rayStartParam"] = rc["spec"]["headGroupSpec"].pop("rayStartParams")


def _wrong_type(rc):
    rc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"


def _missing_template(rc):
    del rc["spec"]["headGroupSpec"]["template"]


def _bad_quantity(rc):
    rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "32 GB"


def _container_typo(rc):
    container = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")


@pytest.mark.parametrize("mistake", [_typo, _wrong_type, _missing_template, _bad_quantity, _container_typo])
def test_a_broken_raycluster_fails_the_crd_schema(mistake):
    rc = raycluster()
    mistake(rc)
    assert crd_errors(rc), f"{mistake.__name__} passed the CRD schema"


def groups(rc: dict) -> list[dict]:
    return [rc["spec"]["headGroupSpec"], *rc["spec"]["workerGroupSpecs"]]


def object_store_fits_shm(group: dict) -> bool:
    """KubeRay mounts /dev/shm sized to the Ray container's memory, where Ray's object store (30% of it by default)
    fits; a /dev/shm of one's own must be bigger than `object-store-memory`, or Ray keeps the store on disk."""
    spec = group["template"]["spec"]
    ray = spec["containers"][0]
    mounts = [m["name"] for m in ray.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
    if not mounts:
        return True
    (volume,) = [v for v in spec.get("volumes", []) if v["name"] == mounts[0]]
    size = volume.get("emptyDir", {}).get("sizeLimit")
    store = group.get("rayStartParams", {}).get("object-store-memory")
    store = quantity(store) if store is not None else 0.3 * quantity(ray["resources"]["limits"]["memory"])
    return size is None or store < quantity(size)


def test_object_store_fits_in_dev_shm():
    rc = raycluster()
    assert all(object_store_fits_shm(g) for g in groups(rc))
    worker = rc["spec"]["workerGroupSpecs"][0]  # the hand-made 8Gi /dev/shm this file had: the store went to disk
    worker["template"]["spec"]["containers"][0]["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    worker["template"]["spec"]["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    assert not object_store_fits_shm(worker)
    worker["rayStartParams"]["object-store-memory"] = str(6 * 2**30)
    assert object_store_fits_shm(worker)


# --- Kubernetes manifests against Kubernetes' schemas -----------------------------------------------------------


def k8s_errors(resource: dict) -> str | None:
    """kubernetes-validate's strict check (unknown fields refused) of one resource: None, or its message."""
    try:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{resource['kind']}: {e.message}"
    return None


def test_rbac_manifest_passes_kubernetes_validate():
    path = K8S / "prefect-rbac.yaml"
    done = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", K8S_VERSION, str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "WARN" not in done.stdout + done.stderr, done.stdout + done.stderr
    docs = load(path)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Namespace", "dcgan"), ("ServiceAccount", "dcgan-flows")} <= kinds
    role = next(d for d in docs if d["kind"] == "Role")
    assert any("batch" in r["apiGroups"] and "jobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])
    role["rules"][0]["verb"] = role["rules"][0].pop("verbs")
    assert k8s_errors(role), "a Role with a misspelt field passed kubernetes-validate"


def test_raycluster_pod_templates_pass_kubernetes_validate():
    """kubernetes-validate has no schema for RayCluster; its pod templates are core/v1 PodTemplateSpecs."""
    rc = raycluster()
    for g in groups(rc):
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": g.get("groupName", "head")},
               "template": g["template"]}
        assert k8s_errors(pod) is None
    container = pod["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    assert k8s_errors(pod), "a container with a misspelt field passed kubernetes-validate"


def flow_run_job(job_variables: dict) -> dict:
    """The Job the work pool's base job template gives a flow run with these job variables, as the Kubernetes
    worker renders it (template defaults, then the deployment's variables; `env` as a list)."""
    from prefect.utilities.templating import apply_values

    template = json.loads((K8S / "base-job-template.json").read_text())
    values = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    values.update(job_variables, name="evaluate-dcgan-1234")
    job = apply_values(template["job_configuration"]["job_manifest"], values)
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in container.get("env", {}).items()]
    return job


def test_flow_run_jobs_pass_kubernetes_validate():
    for name, d in deployments().items():
        job = flow_run_job(d["work_pool"]["job_variables"])
        pod = job["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "dcgan-flows" and job["metadata"]["namespace"] == "dcgan", name
        assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "dcgan-s3", "optional": True}}], name
        # prefect-kubernetes insists on these two in the pod spec (they belong to the Job's); the API server drops
        # them as unknown fields, and so does this check.
        assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
        assert k8s_errors(job) is None, name
    job["spec"]["ttlSecondsAfterFinished"] = "1h"
    assert k8s_errors(job), "a Job with a TTL of '1h' passed kubernetes-validate"


def svm_bytes() -> float:
    """What the CIFAR-10 protocol holds at its peak (dcgan/evaluation/svm.py): the float32 train and test features,
    and LinearSVC's float64 copy plus liblinear's 16-byte sparse entries for all 50,000 training rows."""
    d_channels = yaml.safe_load((REPO / "configs" / "imagenet-32.yaml").read_text())["model"]["d_channels"]
    dim = 4 * 4 * sum(d_channels)  # every conv layer max-pooled to 4x4 (dcgan/evaluation/features.py)
    assert dim == 28_672
    return (50_000 + 10_000) * dim * 4 + 50_000 * dim * (8 + 16)


@pytest.mark.parametrize("name", ["evaluate", "pipeline"])
def test_evaluating_pods_request_the_memory_of_the_cifar10_svm(name):
    resources = flow_run_job(deployments()[name]["work_pool"]["job_variables"])["spec"]["template"]["spec"][
        "containers"][0]["resources"]
    request = quantity(resources["requests"]["memory"])
    assert request >= svm_bytes() + 2 * 2**30  # and about 2 GiB for Python, torch, D and the images
    assert quantity(resources["limits"]["memory"]) >= request


# --- Dockerfile -------------------------------------------------------------------------------------------------


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "hadolint"), "--no-color", str(path)], capture_output=True, text=True,
                          timeout=60)


def test_dockerfile_passes_hadolint_and_installs_wget(tmp_path):
    dockerfile = REPO / "infra" / "Dockerfile"
    done = hadolint(dockerfile)
    assert done.returncode == 0, done.stdout + done.stderr
    installs = re.findall(r"apt-get install ([^\\&\n]+)", dockerfile.read_text())
    assert any("wget" in line.split() for line in installs), installs  # KubeRay < 1.6 probes run wget
    broken = tmp_path / "Dockerfile"  # the apt lists left in the image: hadolint must say so
    broken.write_text(dockerfile.read_text().replace(" \\\n && rm -rf /var/lib/apt/lists/*", ""))
    done = hadolint(broken)
    assert done.returncode != 0 and "DL3009" in done.stdout, done.stdout


# --- prefect deploy against a kubernetes work pool --------------------------------------------------------------


@pytest.mark.slow
def test_kubernetes_deployments_deploy_to_a_kubernetes_work_pool(prefect_server):
    env = prefect_server
    template = K8S / "base-job-template.json"
    prefect(env, "work-pool", "create", "dcgan-k8s", "--type", "kubernetes", "--base-job-template", str(template))
    deployed = prefect(env, "--no-prompt", "deploy", "--all", "--prefect-file", str(K8S / "prefect.yaml"))
    for name in ("build-faces/faces", "build-lsun/lsun", "train-dcgan/train", "train-dcgan/nightly",
                 "evaluate-dcgan/evaluate", "dcgan-pipeline/pipeline"):
        assert name in deployed, deployed

    api = env["PREFECT_API_URL"]
    with urllib.request.urlopen(f"{api}/work_pools/dcgan-k8s", timeout=10) as r:
        pool = json.load(r)
    assert pool["type"] == "kubernetes" and pool["base_job_template"] == json.loads(template.read_text())
    with urllib.request.urlopen(f"{api}/deployments/name/evaluate-dcgan/evaluate", timeout=10) as r:
        evaluate = json.load(r)
    assert evaluate["work_pool_name"] == "dcgan-k8s"
    assert evaluate["job_variables"]["memory_request"] == "44Gi"
    assert evaluate["job_variables"]["service_account_name"] == "dcgan-flows"
    assert evaluate["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/dcgan"}}]
