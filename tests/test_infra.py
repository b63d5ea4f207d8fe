"""infra/ checked offline, as far as a cluster's own checks go without a cluster:

- the RayCluster against KubeRay's v1 CRD schema (vendored, tests/data/README.md) with unknown fields refused, as
  `kubectl apply` refuses them, and its pod templates, the work pool's namespace/RBAC manifest and the flow-run Job
  that the base job template renders for every deployment against Kubernetes' own schemas (kubernetes-validate);
- the RayJob and the nightly RayCronJob (KubeRay v1.6 CRDs, vendored) against their schemas and the checks KubeRay's
  operator makes beyond them, their pod templates, the head's memory against the OOM reports, the workers' own wait for
  the GCS, /dev/shm and the training config they serve, and the entrypoint's config read from object storage;
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
DATA = Path(__file__).parent / "data"
CRD_SCHEMA = DATA / "kuberay-v1.4.2-raycluster-v1.schema.json"
RAYJOB_SCHEMA = DATA / "kuberay-v1.6.2-rayjob-v1.schema.json"  # v1.6: the first KubeRay with RayCronJob
RAYCRONJOB_SCHEMA = DATA / "kuberay-v1.6.2-raycronjob-v1.schema.json"
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
def crd_validator(schema_file: Path = CRD_SCHEMA) -> jsonschema.Validator:
    schema = refuse_unknown_fields(json.loads(schema_file.read_text()))
    return jsonschema.Draft4Validator(schema)  # OpenAPI 3.0 schemas are JSON Schema draft 4 plus extensions


def crd_errors(resource: dict, schema_file: Path = CRD_SCHEMA) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in crd_validator(schema_file).iter_errors(resource)]


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


def test_the_rayjob_deployment_may_create_follow_and_delete_its_rayjobs_and_nothing_else():
    """train-dcgan/nightly-rayjob (`cluster.submit: rayjob`): its pods run as dcgan-rayjobs, which mounts its token and
    may create, get and delete RayJobs in dcgan (what dcgan/rayjob.py calls); every other flow-run pod has no token.
    The RayJob it renders is the image's template, with the run's image, and it starts paused beside `nightly`."""
    from dcgan.config import Config

    docs = {(d["kind"], d["metadata"]["name"]): d for d in load(K8S / "prefect-rbac.yaml")}
    assert docs[("ServiceAccount", "dcgan-rayjobs")]["automountServiceAccountToken"] is True
    assert docs[("ServiceAccount", "dcgan-flows")]["automountServiceAccountToken"] is False
    assert docs[("Role", "dcgan-rayjobs")]["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "delete"]}]
    binding = docs[("RoleBinding", "dcgan-rayjobs")]
    assert binding["roleRef"]["name"] == "dcgan-rayjobs" and binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "dcgan-rayjobs", "namespace": "dcgan"}]
    d = deployments()["nightly-rayjob"]
    env = d["work_pool"]["job_variables"]["env"]
    assert env["DCGAN_RAYJOB_NAMESPACE"] == rayjob()["metadata"]["namespace"]
    assert env["DCGAN_RAYJOB_TEMPLATE"] == "/opt/dcgan/infra/kubernetes/rayjob-train.yaml"
    assert "COPY infra/kubernetes/rayjob-train.yaml ./infra/kubernetes/" in (REPO / "infra" / "Dockerfile").read_text()
    cfg = Config.model_validate(d["parameters"]["config"])
    assert cfg.cluster.submit == "rayjob" and cfg.cluster.image == rayjob()["spec"]["rayClusterSpec"][
        "headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert [s["active"] for s in d["schedules"]] == [False] and d["schedules"][0]["cron"] == deployments()[
        "nightly"]["schedules"][0]["cron"]


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


def work_pool_template() -> dict:
    return json.loads((K8S / "base-job-template.json").read_text())


def flow_run_job(job_variables: dict, template: dict | None = None) -> dict:
    """The Job that Prefect's Kubernetes worker (prefect-kubernetes' own code) creates for a flow run with these job
    variables: the work pool's template with its defaults, then the variables, then the flow run's env and labels."""
    import asyncio
    import uuid

    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    class NoAPI:  # the template names no block and no Prefect variable: rendering must not need the API
        def __getattr__(self, name):
            raise AssertionError(f"rendering the job template called the Prefect API ({name})")

    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        template or work_pool_template(), job_variables, client=NoAPI()))
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="evaluate-dcgan-1234"))
    return config.job_manifest


def pod_of(job: dict) -> dict:
    """The Job's pod spec, less the two fields prefect-kubernetes insists on there (they belong to the Job's spec):
    the API server drops them as unknown fields, and so does this check."""
    pod = job["spec"]["template"]["spec"]
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    return pod


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_flow_run_jobs_pass_kubernetes_validate():
    for name, d in deployments().items():
        job = flow_run_job(d["work_pool"]["job_variables"])
        pod = pod_of(job)
        container = pod["containers"][0]
        account = "dcgan-rayjobs" if name == "nightly-rayjob" else "dcgan-flows"  # only it talks to Kubernetes
        assert pod["serviceAccountName"] == account and job["metadata"]["namespace"] == "dcgan", name
        assert container["envFrom"] == [{"secretRef": {"name": "dcgan-s3", "optional": True}}], name
        env = env_of(container)
        assert env["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": "dcgan-ray-token", "key": "auth_token",
                                                          "optional": True}}, name
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_ADDRESS"].startswith("http"), name
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {}), name  # no GPU unless asked
        assert not {"nodeSelector", "tolerations"} & pod.keys(), name
        assert k8s_errors(job) is None, name
    job["spec"]["ttlSecondsAfterFinished"] = "1h"
    assert k8s_errors(job), "a Job with a TTL of '1h' passed kubernetes-validate"


def test_every_work_pool_variable_is_used_by_the_job_configuration():
    """Prefect's server refuses a placeholder without a variable; the other way round it says nothing, and a variable
    that job_configuration never references is silently ignored. Both directions here, with Prefect's own parser."""
    from prefect.utilities.templating import find_placeholders

    def unused(template: dict) -> set[str]:
        used = {p.name for p in find_placeholders(json.dumps(template["job_configuration"]))}
        return set(template["variables"]["properties"]) ^ used

    template = work_pool_template()
    assert unused(template) == set()
    template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"].pop("tolerations")
    assert unused(template) == {"tolerations"}


GPU_RUN = {"gpu_count": 1, "cpu_request": "6", "cpu_limit": "8", "memory_request": "30Gi", "memory_limit": "30Gi",
           "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
           "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
           "ray_token_secret": "ray-token-b", "storage_secret": "s3-b", "image": "REGISTRY/dcgan-cluster:0.1.0"}


def test_a_gpu_flow_run_gets_what_its_job_variables_ask_for():
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    variables = {**deployments()["evaluate"]["work_pool"]["job_variables"], **GPU_RUN}
    schema = work_pool_template()["variables"]
    validate(variables, schema, raise_on_error=True, ignore_required=True)  # what the server checks on a run
    job = flow_run_job(variables)
    pod = pod_of(job)
    container = pod["containers"][0]
    assert container["image"] == GPU_RUN["image"]
    assert container["resources"] == {"requests": {"cpu": "6", "memory": "30Gi"},
                                      "limits": {"cpu": "8", "memory": "30Gi", "nvidia.com/gpu": 1}}
    assert pod["nodeSelector"] == GPU_RUN["node_selector"] and pod["tolerations"] == GPU_RUN["tolerations"]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-b", "optional": True}}]
    assert env_of(container)["RAY_AUTH_TOKEN"]["secretKeyRef"]["name"] == "ray-token-b"
    assert k8s_errors(job) is None
    for bad in ({"gpu_count": -1}, {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Maybe"}]},
                {"node_selector": {"pool": 3}}):
        with pytest.raises(ValidationError, match=f"Validation failed for field '{next(iter(bad))}[.[']"):
            validate({**variables, **bad}, schema, raise_on_error=True, ignore_required=True)


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


# --- RayJob and RayCronJob against KubeRay v1.6's CRDs and its own checks ---------------------------------------


def rayjob() -> dict:
    (job,) = load(K8S / "rayjob-train.yaml")
    return job


def raycronjob() -> dict:
    (cron,) = load(K8S / "raycronjob-nightly.yaml")
    return cron


RAYJOB_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
MAX_RAYJOB_NAME = 53 - 6  # MaxRayClusterNameLength less the "-xxxxx" of the cluster's name (utils/constant.go)


def _dns1035(name: str) -> bool:
    return len(name) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) is not None


def cron_expression(schedule: str) -> tuple[str, str]:
    """(5-field expression, time zone) of a RayCronJob schedule: robfig/cron's ParseStandard, with its optional
    `CRON_TZ=` or `TZ=` prefix (the operator's local time, UTC in its image, without one)."""
    zone = "UTC"
    if m := re.fullmatch(r"(?:CRON_TZ|TZ)=(\S+)\s+(.*)", schedule.strip()):
        zone, schedule = m.groups()
    return schedule, zone


def cron_errors(schedule: str) -> list[str]:
    from datetime import datetime, timezone

    from cronsim import CronSim, CronSimError

    expression, _ = cron_expression(schedule)
    if len(expression.split()) != 5:  # ParseStandard takes minute hour dom month dow, no seconds field
        return [f"schedule {schedule!r}: want 5 fields"]
    try:
        CronSim(expression, datetime(2026, 1, 1, tzinfo=timezone.utc))
    except CronSimError as err:
        return [f"schedule {schedule!r}: {err}"]
    return []


def kuberay_errors(spec: dict, name: str, generated_suffix: int = 0) -> list[str]:
    """What KubeRay v1.6.2 refuses in a RayJob beyond its CRD schema, from ray-operator/controllers/ray/utils/
    validation.go (ValidateRayJobMetadata, ValidateRayJobSpec, ValidateRayClusterSpec): the operator marks such a
    RayJob ValidationFailed after `kubectl apply` succeeded. `generated_suffix`: characters a RayCronJob appends."""
    errors = []
    if len(name) + generated_suffix > MAX_RAYJOB_NAME or not _dns1035(name):
        errors.append(f"name {name!r}: a DNS-1035 label of at most {MAX_RAYJOB_NAME - generated_suffix} characters")
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    mode = spec.get("submissionMode", "K8sJobMode")
    backoff = spec.get("backoffLimit", 0)
    selector = spec.get("clusterSelector") or {}
    if mode not in RAYJOB_MODES:  # the CRD leaves it a free string
        errors.append(f"submissionMode {mode!r} is none of {RAYJOB_MODES}")
    if spec.get("suspend") and not shutdown:
        errors.append("suspend needs shutdownAfterJobFinishes")
    if spec.get("ttlSecondsAfterFinished", 0) < 0 or (spec.get("ttlSecondsAfterFinished", 0) > 0 and not shutdown):
        errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes and must not be negative")
    if "rayClusterSpec" not in spec and not selector:
        errors.append("one of rayClusterSpec or clusterSelector must be set")
    if selector and (not selector.get("ray.io/cluster") or mode == "SidecarMode" or backoff > 0):
        errors.append("clusterSelector needs ray.io/cluster, and no SidecarMode nor backoffLimit")
    if backoff < 0 or (mode == "InteractiveMode" and backoff > 0):
        errors.append("backoffLimit must be >= 0, and 0 in InteractiveMode")
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if field in spec and spec[field] <= 0:
            errors.append(f"{field} must be positive")
    try:
        yaml.safe_load(spec.get("runtimeEnvYAML", "") or "{}")
    except yaml.YAMLError as err:
        errors.append(f"runtimeEnvYAML is not YAML: {err}")
    cluster = spec.get("rayClusterSpec")
    if cluster is None:
        return errors
    head = cluster["headGroupSpec"]["template"]["spec"]
    if mode == "SidecarMode" and ({"submitterPodTemplate", "submitterConfig"} & spec.keys()
                                 or head.get("restartPolicy", "Never") != "Never"):
        errors.append("SidecarMode: no submitterPodTemplate/submitterConfig, head restartPolicy Never or unset")
    if not head.get("containers"):
        errors.append("headGroupSpec has no container")
    autoscaling = cluster.get("enableInTreeAutoscaling", False)
    for g in cluster.get("workerGroupSpecs", []):
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not g["template"]["spec"].get("containers"):
            errors.append(f"worker group {g['groupName']} has no container")
        if not autoscaling and (lo is None or hi is None):
            errors.append(f"worker group {g['groupName']}: minReplicas and maxReplicas without autoscaling")
        if lo is not None and hi is not None and not 0 <= lo <= hi:
            errors.append(f"worker group {g['groupName']}: minReplicas {lo} > maxReplicas {hi}")
    auth = cluster.get("authOptions") or {}
    if auth.get("enableK8sTokenAuth"):
        errors.append("K8s token auth is not supported for RayJob")
    if auth.get("mode") == "token":
        version = tuple(int(x) for x in re.findall(r"\d+", cluster.get("rayVersion", "0"))[:3])
        if version < (2, 52, 0):
            errors.append(f"authOptions token needs rayVersion >= 2.52.0, not {cluster.get('rayVersion')!r}")
    return errors


def rayjob_errors(job: dict) -> list[str]:
    """The API server's schema check first (what it refuses never reaches the operator), then KubeRay's."""
    return crd_errors(job, RAYJOB_SCHEMA) or kuberay_errors(job["spec"], job["metadata"]["name"])


def raycronjob_errors(cron: dict) -> list[str]:
    return crd_errors(cron, RAYCRONJOB_SCHEMA) or cron_errors(cron["spec"]["schedule"]) or kuberay_errors(
        cron["spec"]["jobTemplate"], cron["metadata"]["name"], generated_suffix=6)


def test_rayjob_and_raycronjob_pass_kuberay_v1_6_checks():
    job, cron = rayjob(), raycronjob()
    assert (job["apiVersion"], job["kind"], cron["apiVersion"], cron["kind"]) == (
        "ray.io/v1", "RayJob", "ray.io/v1", "RayCronJob")
    assert rayjob_errors(job) == []
    assert raycronjob_errors(cron) == []


def _spec(job):
    return job["spec"] if job["kind"] == "RayJob" else job["spec"]["jobTemplate"]


def _cluster(job):
    return _spec(job)["rayClusterSpec"]


def _worker(job):
    return _cluster(job)["workerGroupSpecs"][0]


RAYJOB_MISTAKES = {
    "misspelt shutdown": lambda j: _spec(j).update(shutdownAfterJobFinish=_spec(j).pop("shutdownAfterJobFinishes")),
    "backoffLimit as a word": lambda j: _spec(j).update(backoffLimit="two"),
    "TTL without shutdown": lambda j: _spec(j).update(shutdownAfterJobFinishes=False),
    "unknown submission mode": lambda j: _spec(j).update(submissionMode="Sidecar"),
    "sidecar with a restarting head": lambda j: _cluster(j)["headGroupSpec"]["template"]["spec"].update(
        restartPolicy="Always"),
    "no cluster for the job": lambda j: _spec(j).pop("rayClusterSpec"),
    "zero deadline": lambda j: _spec(j).update(activeDeadlineSeconds=0),
    "memory '32 GB'": lambda j: _worker(j)["template"]["spec"]["containers"][0]["resources"]["limits"].update(
        memory="32 GB"),
    "worker group without maxReplicas": lambda j: _worker(j).pop("maxReplicas"),
    "token auth on an old Ray": lambda j: _cluster(j).update(rayVersion="2.48.0"),
    "name too long": lambda j: j["metadata"].update(name="dcgan-train-lsun-bedrooms-64-every-night-on-gpus"),
}


@pytest.mark.parametrize("mistake", RAYJOB_MISTAKES, ids=list(RAYJOB_MISTAKES))
@pytest.mark.parametrize("kind", ["RayJob", "RayCronJob"])
def test_a_broken_rayjob_or_raycronjob_fails_the_checks(kind, mistake):
    job, errors = (rayjob(), rayjob_errors) if kind == "RayJob" else (raycronjob(), raycronjob_errors)
    RAYJOB_MISTAKES[mistake](job)
    assert errors(job), f"{kind} with {mistake} passed"


@pytest.mark.parametrize("schedule", ["0 0 2 * * *", "0 25 * * *", "nightly"])
def test_a_raycronjob_with_a_bad_schedule_fails(schedule):
    cron = raycronjob()
    cron["spec"]["schedule"] = schedule
    assert raycronjob_errors(cron)


def test_raycronjob_runs_the_rayjob_nightly_without_overlap():
    """The nightly RayCronJob is the RayJob on a schedule (one spec to review), at the Prefect nightly's time, and an
    attempt ends before the next night's starts on the same training run."""
    from datetime import datetime, timezone

    from cronsim import CronSim

    job, cron = rayjob(), raycronjob()
    assert cron["spec"]["jobTemplate"] == job["spec"]
    expression, zone = cron_expression(cron["spec"]["schedule"])
    (nightly,) = deployments()["nightly"]["schedules"]
    assert (expression, zone) == (nightly["cron"], nightly["timezone"])
    it = CronSim(expression, datetime(2026, 1, 1, tzinfo=timezone.utc))
    first = next(it)
    period = (next(it) - first).total_seconds()
    assert job["spec"]["activeDeadlineSeconds"] < period


def test_rayjob_pod_templates_pass_kubernetes_validate():
    job = rayjob()
    for g in [_cluster(job)["headGroupSpec"], *_cluster(job)["workerGroupSpecs"]]:
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": g.get("groupName", "head")},
               "template": g["template"]}
        assert k8s_errors(pod) is None
    init = pod["template"]["spec"]["initContainers"][0]
    init["resource"] = init.pop("resources")
    assert k8s_errors(pod), "an init container with a misspelt field passed kubernetes-validate"


def test_rayjob_service_account_exists_in_ray_rbac():
    docs = load(K8S / "ray-rbac.yaml")
    assert all(k8s_errors(d) is None for d in docs)
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    cluster = _cluster(rayjob())
    used = {g["template"]["spec"]["serviceAccountName"]
            for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]}
    assert used == {"dcgan-ray"} <= accounts
    sa = next(d for d in docs if d["metadata"]["name"] == "dcgan-ray")
    assert sa.get("automountServiceAccountToken", True)  # KubeRay's autoscaler in the head uses its token


# Head memory: KubeRay's sample head was OOMKilled at start with 2Gi requested and a 4Gi limit (kuberay#4287), fixed
# with a 5Gi limit for a head that runs nothing; ours also runs the training driver (`import torch, ray.train,
# ray.data, dcgan.train` alone is 0.47 GiB RSS, measured) and its object store lives in its own memory.
IDLE_HEAD = quantity("5Gi")
DRIVER = quantity("1Gi")


def head_fits(cluster: dict) -> bool:
    head = cluster["headGroupSpec"]
    ray = head["template"]["spec"]["containers"][0]["resources"]
    store = quantity(head["rayStartParams"].get("object-store-memory", 0.3 * quantity(ray["limits"]["memory"])))
    request, limit = quantity(ray["requests"]["memory"]), quantity(ray["limits"]["memory"])
    return request == limit and limit >= IDLE_HEAD + DRIVER + store


def test_rayjob_head_is_sized_against_the_oom_reports():
    cluster = _cluster(rayjob())
    assert head_fits(cluster)
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    head["requests"]["memory"], head["limits"]["memory"] = "2Gi", "5Gi"  # KubeRay's fixed sample
    assert not head_fits(cluster)


def test_rayjob_workers_wait_for_the_gcs_without_the_256mi_init_container():
    """kuberay#2735: the injected wait-gcs-ready (200m / 256Mi, hard-coded) is OOMKilled by `ray health-check`; the
    operator runs with ENABLE_INIT_CONTAINER_INJECTION=false (infra/README.md) and the template brings its own."""
    cluster = _cluster(rayjob())
    spec = _worker(rayjob())["template"]["spec"]
    (init,) = spec["initContainers"]
    assert init["name"] != "wait-gcs-ready"  # a second one of that name, were injection left on, fails the pod
    assert "ray health-check" in " ".join(init["args"]) and "$FQ_RAY_IP" in " ".join(init["args"])
    assert quantity(init["resources"]["limits"]["memory"]) >= quantity("1Gi") > quantity("256Mi")
    token = {e["name"]: e for e in init["env"]}["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": cluster["authOptions"]["secretName"], "key": "auth_token"}  # KubeRay's key


def test_rayjob_gpu_workers_fit_the_training_config():
    """Scale from zero to what `cluster.workers` asks, one Ray Train worker per 1-GPU pod, object store in /dev/shm
    and /dev/shm inside the pod's memory (tmpfs pages count against the container's limit)."""
    job = rayjob()
    worker = _worker(job)
    ray = worker["template"]["spec"]["containers"][0]
    limits = ray["resources"]["limits"]
    cfg = yaml.safe_load((REPO / "configs" / "lsun-bedrooms-64.yaml").read_text())["cluster"]
    assert worker["minReplicas"] == 0 == worker.get("replicas", 0) and _cluster(job)["enableInTreeAutoscaling"]
    assert worker["maxReplicas"] >= cfg["workers"] and cfg["use_gpu"] and limits["nvidia.com/gpu"] == "1"
    assert cfg["cpus_per_worker"] <= quantity(limits["cpu"])
    assert all(object_store_fits_shm(g) for g in [_cluster(job)["headGroupSpec"], worker])
    (shm,) = [v for v in worker["template"]["spec"]["volumes"] if v["name"] == "dshm"]
    assert quantity(shm["emptyDir"]["sizeLimit"]) + quantity("8Gi") <= quantity(limits["memory"])
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["template"]["spec"][
        "tolerations"]


def test_rayjob_entrypoint_is_a_dcgan_command_on_a_config_in_object_storage():
    import shlex

    from dcgan.cli import build_parser

    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    assert argv[0] == "dcgan"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "train" and args.config.startswith("s3://")


def test_a_rayjob_rendered_for_a_run_passes_the_checks_and_trains_the_runs_config():
    """`cluster.submit: rayjob`: the template rendered for one run (dcgan.rayjob.render) is still a RayJob KubeRay
    v1.6 takes, names this run's config in object storage, uses the run's image everywhere, can grow to its workers,
    and each attempt gets its own name."""
    import shlex

    from dcgan import rayjob
    from dcgan.cli import build_parser
    from dcgan.config import load_config

    cfg = load_config(REPO / "configs" / "lsun-bedrooms-64.yaml", {
        "root": "s3://dcgan", "cluster.workers": 16, "cluster.submit": "rayjob", "cluster.image": "registry.example/dcgan:1.2.3"})
    template = rayjob.load_template(K8S / "rayjob-train.yaml")
    name = rayjob.job_name(cfg)
    config = rayjob.config_uri(cfg.run_uri, name)
    job = rayjob.render(template, cfg, name, config)
    assert rayjob_errors(job) == [] and job["metadata"]["name"] == name != rayjob.job_name(cfg)
    assert len(name) <= MAX_RAYJOB_NAME and job["metadata"]["annotations"]["dcgan.run"] == cfg.run_uri
    args = build_parser().parse_args(shlex.split(job["spec"]["entrypoint"])[1:])
    assert args.command == "train" and args.config == config == f"{cfg.run_uri}/rayjobs/{name}.yaml"
    assert config.startswith("s3://")
    images = {c["image"] for pod in rayjob._pod_specs(job) for c in pod["containers"] + pod.get("initContainers", [])}
    assert images == {"registry.example/dcgan:1.2.3"}
    assert _worker(job)["maxReplicas"] == 16 and _worker(job)["minReplicas"] == 0
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    assert template == rayjob.load_template(K8S / "rayjob-train.yaml")  # the template itself is not changed


@pytest.mark.parametrize("change, says", [({"cluster.cpus_per_worker": 9}, "cluster.cpus_per_worker=9"),
                                          ({"cluster.use_gpu": False}, "no worker group without GPUs")])
def test_a_rayjob_whose_pods_cannot_hold_a_worker_is_one_line(change, says):
    from dcgan import rayjob
    from dcgan.config import ConfigError, load_config

    cfg = load_config(REPO / "configs" / "lsun-bedrooms-64.yaml", change)
    with pytest.raises(ConfigError) as caught:
        rayjob.render(rayjob.load_template(), cfg, "dcgan-train-x", "s3://dcgan/runs/x/rayjobs/x.yaml")
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_train_config_loads_from_object_storage(s3_bucket):
    """The entrypoint's `--config s3://...`: the same config as from a file; a missing one is one line, exit 2."""
    from dcgan.config import load_config
    from preprocessing import storage

    text = (REPO / "configs" / "lsun-bedrooms-64.yaml").read_text().replace("root: ./runs", f"root: {s3_bucket}")
    uri = f"{s3_bucket}/configs/lsun-bedrooms-64.yaml"
    storage.write_text(uri, text)
    cfg = load_config(uri, {"train.steps": 7})
    assert cfg == load_config(REPO / "configs" / "lsun-bedrooms-64.yaml", {"root": s3_bucket, "train.steps": 7})
    done = subprocess.run([str(BIN / "dcgan"), "train", "--config", f"{s3_bucket}/configs/missing.yaml"],
                          capture_output=True, text=True, timeout=120)
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("dcgan train: error: ")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1 and "missing.yaml: no such object" in errors[0], done.stderr


# --- the runbook (infra/README.md section 5) against the manifests ----------------------------------------------

# Containers the runbook names that KubeRay makes, not infra/kubernetes: the SidecarMode submitter, the autoscaler and
# the injected init container (ray-operator/controllers/ray/utils/constant.go, common/pod.go at v1.6.2).
MADE_BY_KUBERAY = {"ray-job-submitter", "autoscaler", "wait-gcs-ready"}


def runbook() -> str:
    text = (REPO / "infra" / "README.md").read_text()
    return text[text.index("## 5. Runbook"):text.index("## What the tests run")]


def runbook_commands(text: str) -> list[str]:
    """The shell commands of the runbook's code blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [re.sub(r"\s+#\s.*$", "", line).strip() for line in lines if line.strip()]


def strings(node) -> list[str]:
    """Every key and string value in a parsed manifest."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (str(k), *strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def secret_refs(node, found=None) -> dict[str, set[str]]:
    """Secret name -> keys the manifests read from it (empty for a whole-Secret envFrom)."""
    found = {} if found is None else found
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("secretRef", "secretKeyRef") and isinstance(value, dict):
                keys = found.setdefault(value["name"], set())
                if "key" in value:
                    keys.add(value["key"])
            elif key == "authOptions" and "secretName" in value:
                found.setdefault(value["secretName"], set()).add("auth_token")  # KubeRay's key for the token
            secret_refs(value, found)
    elif isinstance(node, list):
        for value in node:
            secret_refs(value, found)
    return found


def runbook_problems(text: str) -> list[str]:
    """What the runbook names that infra/kubernetes (or KubeRay itself) does not define."""
    import shlex

    import pipelines.flows
    from dcgan.config import load_config

    docs = {p.name: load(p) for p in K8S.glob("*.yaml")}
    template = work_pool_template()
    everything = [d for ds in docs.values() for d in ds] + [template]
    k8s = [d for d in everything if "kind" in d and "metadata" in d]
    values = set(strings(everything))
    defined = {(d["kind"].lower(), d["metadata"]["name"]) for d in k8s}
    containers = {c["name"] for d in k8s for c in _containers(d)} | MADE_BY_KUBERAY
    secrets = secret_refs(everything)
    for d in template["variables"]["properties"].values():  # the work pool's defaults name Secrets too
        if d.get("title", "").endswith("Secret"):
            secrets.setdefault(d["default"], set())
    (prefect_file,) = docs["prefect.yaml"]
    pools = {d["work_pool"]["name"] for d in prefect_file["deployments"]}
    flows = {f"{getattr(pipelines.flows, d['entrypoint'].split(':')[1]).name}/{d['name']}"
             for d in prefect_file["deployments"]}
    job = rayjob()
    config_uri = shlex.split(job["spec"]["entrypoint"])[3]
    run_uri = load_config(REPO / "configs" / "lsun-bedrooms-64.yaml", {"root": config_uri.rsplit("/configs/")[0]}).run_uri
    created = set(re.findall(r'\.metadata\.name = "([a-z0-9-]+)"', text))
    kuberay = yaml.safe_load((K8S / "kuberay-values.yaml").read_text())
    problems = []

    for path in re.findall(r"infra/[\w/.-]+\.(?:yaml|json)|infra/Dockerfile", text):
        if not (REPO / path).exists():
            problems.append(f"file {path} does not exist")
    for name in re.findall(r"`([\w-]+\.(?:yaml|json))`", text):
        if not (K8S / name).exists() and not (REPO / name).exists():
            problems.append(f"file {name} is not in infra/kubernetes")
    dcgan_name = r"\bdcgan-[a-z0-9-]*[a-z0-9]\b"
    tokens = {t for v in values for t in re.findall(dcgan_name, v)}
    for name in set(re.findall(dcgan_name, text)) - created:
        if name not in tokens and not re.fullmatch(r"dcgan-nightly-x+", name):
            problems.append(f"{name} is named nowhere in infra/kubernetes")
    for command in runbook_commands(text):
        namespaces = re.findall(r"(?:-n|--namespace) ([a-z0-9-]+)", command)
        for ns in namespaces:
            if ns != "dcgan" and "--create-namespace" not in command and not any(
                    f"--namespace {ns}" in c and "--create-namespace" in c for c in runbook_commands(text)):
                problems.append(f"namespace {ns} is neither the manifests' nor created: {command}")
        for kind, name in re.findall(r"\b(rayjob|raycronjob|serviceaccount)s? ([a-z][a-z0-9-]*)", command):
            if (kind, name) not in defined and name not in created:
                problems.append(f"{kind} {name} is not defined in infra/kubernetes: {command}")
        for name in re.findall(r"-c ([a-z][a-z0-9-]*)", command):
            if name not in containers:
                problems.append(f"container {name} is in no manifest: {command}")
        if m := re.search(r"create secret generic ([a-z0-9-]+)(.*)", command):
            name, rest = m.groups()
            keys = set(re.findall(r"--from-literal=(\w+)=", rest))
            if name not in secrets:
                problems.append(f"secret {name} is read by no manifest")
            elif not secrets[name] <= keys:
                problems.append(f"secret {name} lacks the keys {sorted(secrets[name] - keys)} the manifests read")
        for name in re.findall(r"get secret ([a-z0-9-]+)", command):
            if name not in secrets:
                problems.append(f"secret {name} is read by no manifest")
        for name in re.findall(r"work-pool create ([a-z0-9-]+)", command):
            if name not in pools:
                problems.append(f"work pool {name} is not the deployments' ({pools})")
        for name in re.findall(r"deployment (?:run|schedule (?:clear|pause|resume|ls)) ([\w-]+/[\w-]+)", command):
            if name not in flows:
                problems.append(f"deployment {name} is not in infra/kubernetes/prefect.yaml")
        for name in re.findall(r"ray\.io/cronjob-name=([a-z0-9-]+)", command):
            if ("raycronjob", name) not in defined:
                problems.append(f"label ray.io/cronjob-name={name}: no such RayCronJob")
        if "kuberay-operator" in command and (m := re.search(r"--version (\S+)", command)):
            if m.group(1) not in RAYJOB_SCHEMA.name:
                problems.append(f"KubeRay {m.group(1)}: the manifests are checked against {RAYJOB_SCHEMA.name}")
        for uri in re.findall(r"s3://[\w./-]+", command):
            if uri.startswith("s3://dcgan/configs/") and uri != config_uri:
                problems.append(f"{uri} is not the RayJob's config {config_uri}")
            if uri.startswith("s3://dcgan/runs/") and not uri.startswith(run_uri + "/"):
                problems.append(f"{uri} is not under the run {run_uri}")
    worker = yaml.safe_load((K8S / "prefect-worker-values.yaml").read_text())["worker"]
    if worker["config"]["workPool"] not in pools:
        problems.append(f"prefect-worker-values.yaml polls {worker['config']['workPool']}, not {pools}")
    gates = {g["name"]: g["enabled"] for g in kuberay["featureGates"]}
    env = {e["name"]: e["value"] for e in kuberay["env"]}
    if "RayCronJob" in text and gates.get("RayCronJob") is not True:
        problems.append("kuberay-values.yaml does not turn RayCronJob on")
    if "ENABLE_INIT_CONTAINER_INJECTION" in text and env.get("ENABLE_INIT_CONTAINER_INJECTION") != "false":
        problems.append("kuberay-values.yaml leaves KubeRay's init container on")
    return problems


def _containers(doc: dict) -> list[dict]:
    """Every container and init container of every pod template in a manifest."""
    found = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found += [c for c in value if isinstance(c, dict)]
            else:
                found += _containers(value)
    elif isinstance(doc, list):
        for value in doc:
            found += _containers(value)
    return found


def test_runbook_names_only_what_the_manifests_define():
    text = runbook()
    assert runbook_commands(text), "the runbook has no commands"
    assert runbook_problems(text) == []


RUNBOOK_MISTAKES = [
    ("--from-literal=auth_token=", "--from-literal=token="),          # the key KubeRay reads
    ("generic dcgan-ray-token", "generic dcgan-ray-tokens"),
    ("get rayjob dcgan-train", "get rayjob dcgan-training"),
    ("-c ray-job-submitter", "-c submitter"),
    ("schedule clear train-dcgan/nightly", "schedule clear train/nightly"),
    ("--version 1.6.2", "--version 1.5.1"),                            # no RayCronJob there
    ("cronjob-name=dcgan-nightly", "cronjob-name=nightly"),
    ("s3 cp /tmp/lsun-bedrooms-64.yaml s3://dcgan/configs/lsun-bedrooms-64.yaml",
     "s3 cp /tmp/lsun-bedrooms-64.yaml s3://dcgan/configs/bedrooms.yaml"),
    ("work-pool create dcgan-k8s", "work-pool create dcgan-kubernetes"),
    ("-f infra/kubernetes/ray-rbac.yaml", "-f infra/kubernetes/ray-sa.yaml"),
]


@pytest.mark.parametrize("right, wrong", RUNBOOK_MISTAKES, ids=[w for _, w in RUNBOOK_MISTAKES])
def test_a_runbook_naming_something_else_is_caught(right, wrong):
    text = runbook()
    assert right in text
    assert runbook_problems(text.replace(right, wrong)), f"{wrong!r} passed"


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
def test_kubernetes_deployments_deploy_to_a_kubernetes_work_pool(prefect_server, tmp_path):
    """The pool, the deployments and a GPU flow run's job variables, each checked by a real Prefect server (which
    needs no prefect-kubernetes for any of it: only the worker that runs the flows does)."""
    env = prefect_server
    template = K8S / "base-job-template.json"
    broken = tmp_path / "broken.json"  # a placeholder without a variable: the server must refuse the pool
    broken.write_text(template.read_text().replace("{{ gpu_count }}", "{{ gpus }}"))
    done = subprocess.run([str(BIN / "prefect"), "work-pool", "create", "broken", "--type", "kubernetes",
                           "--base-job-template", str(broken)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "gpus" in done.stdout + done.stderr, done.stdout + done.stderr
    prefect(env, "work-pool", "create", "dcgan-k8s", "--type", "kubernetes", "--base-job-template", str(template))
    deployed = prefect(env, "--no-prompt", "deploy", "--all", "--prefect-file", str(K8S / "prefect.yaml"))
    for name in ("build-faces/faces", "build-lsun/lsun", "train-dcgan/train", "train-dcgan/nightly",
                 "train-dcgan/nightly-rayjob", "evaluate-dcgan/evaluate", "dcgan-pipeline/pipeline"):
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
    with urllib.request.urlopen(f"{api}/deployments/name/train-dcgan/nightly-rayjob", timeout=10) as r:
        on_rayjob = json.load(r)  # the YAML merge of the flow-run env kept, the RayJob settings added, paused
    variables = on_rayjob["job_variables"]
    assert variables["service_account_name"] == "dcgan-rayjobs" and variables["env"]["RAY_AUTH_MODE"] == "token"
    assert variables["env"]["DCGAN_RAYJOB_NAMESPACE"] == "dcgan" and on_rayjob["parameters"]["config"]["cluster"][
        "submit"] == "rayjob"
    assert [s["active"] for s in on_rayjob["schedules"]] == [False]

    prefect(env, "deployment", "schedule", "clear", "train-dcgan/nightly", "-y")  # as the runbook does (5.10)
    with urllib.request.urlopen(f"{api}/deployments/name/train-dcgan/nightly", timeout=10) as r:
        assert json.load(r)["schedules"] == []

    gpu = [a for k, v in GPU_RUN.items() for a in ("--job-variable", f"{k}={json.dumps(v)}")]
    config = ["--param", 'config={"name": "lsun-bedrooms-64", "root": "s3://dcgan"}']
    out = prefect(env, "deployment", "run", "evaluate-dcgan/evaluate", *config, *gpu)
    (run_id,) = re.findall(r"UUID: ([0-9a-f-]{36})", out)
    with urllib.request.urlopen(f"{api}/flow_runs/{run_id}", timeout=10) as r:
        run = json.load(r)
    assert run["job_variables"] == GPU_RUN
    job = flow_run_job({**evaluate["job_variables"], **run["job_variables"]})  # what the worker would create
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    done = subprocess.run([str(BIN / "prefect"), "deployment", "run", "evaluate-dcgan/evaluate", *config,
                           "--job-variable", "gpu_count=-1"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "gpu_count" in done.stdout + done.stderr, done.stdout + done.stderr
