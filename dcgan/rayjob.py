"""`dcgan train` as a KubeRay RayJob (`cluster.submit: rayjob`; layer: dcgan).

Instead of a Ray Job on a standing cluster, the run gets a cluster of its own that KubeRay deletes after it
(infra/kubernetes/rayjob-train.yaml: GPU workers from zero, a head sized against the OOM reports). This module renders
that template for one run (its resolved config written to object storage, the image, the worker count), creates the
RayJob through the Kubernetes API, and follows it to its end. The log is the same as a Jobs API submission's: once
KubeRay reports the job's id and its cluster's dashboard, the Ray job is followed through that cluster's Jobs API
(`dcgan.jobs.follow`), so the Prefect run gets the same lines, progress and result. A retried attempt (backoffLimit)
is a new Ray job on a new cluster and is followed in turn. A RayJob that still says Running while its cluster does not
answer (KubeRay #3860, #4217: a restarted head, a leaked cluster) is deleted after `jobs.lost_after_s()` and reported
as a lost cluster in one line; so is a cancelled follower's RayJob (Ctrl-C, SIGTERM, a cancelled Prefect run).
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import shlex
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import yaml

from dcgan import jobs, run_layout
from dcgan.config import Config, ConfigError, dump_config
from preprocessing import ownership, progress, storage
from preprocessing.errors import InputError, one_line

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
TEMPLATE_ENV, NAMESPACE_ENV = "DCGAN_RAYJOB_TEMPLATE", "DCGAN_RAYJOB_NAMESPACE"
TEMPLATE = Path(__file__).resolve().parents[1] / "infra" / "kubernetes" / "rayjob-train.yaml"
MAX_NAME = 47  # KubeRay: a RayCluster name of at most 53 characters, the RayJob's name plus "-xxxxx"
DONE = {"Complete", "Failed", "ValidationFailed"}  # jobDeploymentStatus values after which nothing changes
Emit = Callable[[str], None]


def job_name(cfg: Config) -> str:
    """A RayJob name for one attempt of this run: a DNS-1035 label short enough for KubeRay's cluster name."""
    slug = re.sub(r"[^a-z0-9-]+", "-", cfg.name.lower()).strip("-")[:MAX_NAME - 19].strip("-") or "run"
    return f"dcgan-train-{slug}-{uuid.uuid4().hex[:6]}"


def config_uri(run_uri: str, name: str) -> str:
    """Where the RayJob's entrypoint reads its config: beside the run, one file per RayJob (what each one ran)."""
    return run_layout.rayjob_config(run_uri, name)


def load_template(path: str | Path | None = None) -> dict[str, Any]:
    """The RayJob template: `path`, DCGAN_RAYJOB_TEMPLATE, the repository's, else the one under the current
    directory (an installed package has no infra/; the image keeps it at /opt/dcgan)."""
    here = Path.cwd() / "infra" / "kubernetes" / TEMPLATE.name
    path = Path(path or os.environ.get(TEMPLATE_ENV) or (TEMPLATE if TEMPLATE.is_file() else here))
    try:
        (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise InputError(f"cannot read the RayJob template {path}: {one_line(err)}") from None
    return doc


def _pod_specs(job: dict[str, Any]) -> Iterator[dict[str, Any]]:
    cluster = job["spec"]["rayClusterSpec"]
    yield cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["template"]["spec"]


def _quantity(q: str | int | float) -> float:
    units = {"m": 1e-3, "k": 1e3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "M": 1e6, "G": 1e9, "T": 1e12}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q)).groups()
    return float(number) * units.get(unit, 1)


def render(template: dict[str, Any], cfg: Config, name: str, config: str) -> dict[str, Any]:
    """The RayJob for this run: `template` with its name, the entrypoint `dcgan train --config <config> --json`, the
    image `cfg.cluster.image`, and a worker group that can grow to `cfg.cluster.workers` pods. ConfigError (one
    line) when the template's worker pods cannot hold a training worker as configured."""
    job = copy.deepcopy(template)
    meta = job.setdefault("metadata", {})
    meta["name"] = name
    meta.setdefault("labels", {})["app.kubernetes.io/instance"] = name
    meta.setdefault("annotations", {}).update({"dcgan.run": cfg.run_uri, "dcgan.config": config})
    spec = job["spec"]
    spec["entrypoint"] = shlex.join(["dcgan", "train", "--config", config, "--json"])
    spec["runtimeEnvYAML"] = yaml.safe_dump({"env_vars": dict(jobs.JOB_ENV)}, sort_keys=True)
    if cfg.cluster.image:
        for pod in _pod_specs(job):
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                container["image"] = cfg.cluster.image
    gpu = "nvidia.com/gpu"
    groups = spec["rayClusterSpec"].get("workerGroupSpecs", [])
    fitting = [g for g in groups if bool(_limits(g).get(gpu)) == cfg.cluster.use_gpu]
    if not fitting:
        raise ConfigError(f"cluster.use_gpu is {cfg.cluster.use_gpu} but the RayJob template has no worker group "
                          f"{'with' if cfg.cluster.use_gpu else 'without'} GPUs ({TEMPLATE_ENV} names another)")
    group = fitting[0]
    cpus = _quantity(_limits(group).get("cpu", "0"))
    if cfg.cluster.cpus_per_worker > cpus:
        raise ConfigError(f"cluster.cpus_per_worker={cfg.cluster.cpus_per_worker:g} but a pod of worker group "
                          f"{group['groupName']} has {cpus:g} CPU; lower cluster.cpus_per_worker or give the template's "
                          "pods more")
    group["maxReplicas"] = max(int(group.get("maxReplicas", 0)), cfg.cluster.workers)
    return job


def _limits(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})


class KubernetesRayJobs:
    """RayJobs of one namespace through the Kubernetes API, with kubernetes_asyncio (what prefect-kubernetes uses,
    so a Kubernetes work pool's image has it): the pod's service account inside a cluster, else the kubeconfig
    (KUBECONFIG). Each call is one short request; the follower polls."""

    def __init__(self, namespace: str | None = None):
        try:
            from kubernetes_asyncio import client, config
        except ImportError:
            raise InputError("cluster.submit rayjob needs the kubernetes_asyncio client (pip install "
                             "prefect-kubernetes, which brings it)") from None
        self.namespace = namespace or os.environ.get(NAMESPACE_ENV) or "dcgan"
        self._client = client
        self._configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=self._configuration)
        except config.ConfigException:
            try:
                asyncio.run(config.load_kube_config(config_file=os.environ.get("KUBECONFIG"),
                                                    client_configuration=self._configuration))
            except (config.ConfigException, OSError) as err:
                raise InputError(f"cluster.submit rayjob: no Kubernetes API to talk to (not in a pod, and no "
                                 f"kubeconfig: {one_line(err)})") from None

    def _call(self, method: str, *args: Any) -> Any:
        async def call() -> Any:
            async with self._client.ApiClient(self._configuration) as api:
                return await getattr(self._client.CustomObjectsApi(api), method)(
                    GROUP, VERSION, self.namespace, PLURAL, *args, _request_timeout=jobs.POLL_TIMEOUT_S)

        return asyncio.run(call())

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("create_namespaced_custom_object", body)

    def get(self, name: str) -> dict[str, Any]:
        return self._call("get_namespaced_custom_object", name)

    def delete(self, name: str) -> None:
        self._call("delete_namespaced_custom_object", name)


def _relay(line: str, emit: Emit) -> None:
    """A job's log line to this process's progress listeners (Prefect's progress artifacts) and the caller."""
    progress.relay(line)
    emit(f"[ray job] {line}")


def follow(api: Any, name: str, emit: Emit, poll_s: float = 2.0) -> tuple[dict[str, Any], str]:
    """Follow RayJob `name` to its end: its state changes as lines, each attempt's Ray job log through the Jobs API
    of the attempt's cluster. Returns (its final status, the last attempt's log). A RayJob still Running with a
    cluster that stopped answering is deleted and raises RayClusterLost; so does one whose Kubernetes API stopped
    answering for `jobs.lost_after_s()`. Interrupted (Ctrl-C, SIGTERM), the RayJob is deleted."""
    wait, shown, followed, logs = jobs.lost_after_s(), None, set(), ""
    silent_since: float | None = None
    lost: tuple[str, float, str] | None = None  # (job id, since, why) of an attempt whose cluster stopped answering
    ended: tuple[str, float, str] | None = None  # (job id, since, Ray's status) of an attempt whose Ray job ended
    done = False
    try:
        with jobs._sigterm_stops():
            while True:
                try:
                    status = api.get(name).get("status") or {}
                    silent_since = None
                except Exception as err:  # noqa: BLE001 - the API server is down or refuses us
                    if not (jobs._no_answer(err) or 500 <= int(getattr(err, "status", 0) or 0) < 600):
                        raise
                    silent_since = silent_since or time.monotonic()
                    if time.monotonic() - silent_since >= wait:
                        raise jobs.RayClusterLost(f"the Kubernetes API did not answer for {wait:.0f} s while RayJob "
                                                  f"{name} ran ({one_line(err)})") from None
                    time.sleep(poll_s)
                    continue
                state = status.get("jobDeploymentStatus") or "New"
                if state != shown:
                    why = ": ".join(str(status[k]) for k in ("reason", "message") if status.get(k))
                    emit(f"RayJob {name}: {state}" + (f" ({why})" if why else ""))
                    shown = state
                if state in DONE:
                    done = True
                    return status, logs
                job_id, dashboard = status.get("jobId"), status.get("dashboardURL")
                if state == "Running" and job_id and dashboard and job_id not in followed:
                    followed.add(job_id)
                    address = dashboard if "://" in dashboard else f"http://{dashboard}"
                    try:
                        info, logs = jobs.follow(jobs.connect(address), job_id, lambda line: _relay(line, emit),
                                                 poll_s=poll_s, address=address)
                        ended = (job_id, time.monotonic(), str(info.status))
                    except jobs.RayClusterUnreachable as err:  # KubeRay decides: a retry, or Failed
                        lost = (job_id, time.monotonic(), one_line(err))
                        emit(f"{one_line(err)}; waiting for RayJob {name} to say what happens next")
                    continue
                if ended and job_id == ended[0] and time.monotonic() - ended[1] >= wait:  # KubeRay is late to say
                    emit(f"RayJob {name} still says {state} {wait:.0f} s after its Ray job ended {ended[2]}")
                    done = True
                    return {**status, "jobDeploymentStatus": "Complete" if ended[2] == "SUCCEEDED" else "Failed",
                            "jobStatus": ended[2]}, logs
                if lost and job_id == lost[0] and state == "Running" and time.monotonic() - lost[1] >= wait:
                    raise jobs.RayClusterLost(
                        f"RayJob {name} still says Running but its cluster at {dashboard} is gone ({lost[2]}); "
                        "deleted it (KubeRay would keep its cluster); run the same command again: training resumes "
                        "from its newest checkpoint")
                time.sleep(poll_s)
    except BaseException:
        if not done:
            try:
                api.delete(name)
                emit(f"deleted RayJob {name}")
            except Exception:  # noqa: BLE001 - the original failure is the one to report
                pass
        raise


def run(call: Any, emit: Emit, inside: Config, result_of: Callable[[str], dict[str, Any]], api: Any = None,
        poll_s: float = 2.0) -> dict[str, Any]:
    """Train `call.config` as a RayJob and return the stage's result, as `stages.run_as_job` does for a Ray Job:
    `inside` is the config the job runs (`stages.job_config`), `result_of` reads the result from the job's log."""
    cfg = call.config
    if call.stage != "train":
        raise InputError(f"cluster.submit rayjob runs `train` only, not {call.stage}; use jobs-api for it")
    if not storage.is_s3(cfg.run_uri):
        raise InputError(f"cluster.submit rayjob needs the run in object storage (s3://...), not {cfg.run_uri}: the "
                         "RayJob's cluster cannot read this machine's files")
    template = load_template()
    name = job_name(cfg)
    config = config_uri(cfg.run_uri, name)
    job = render(template, cfg, name, config)
    ownership.claim(cfg.run_uri, "run", legacy=lambda uri: storage.exists(run_layout.config(uri)))
    # on the RayJob's own cluster: join it (RAY_ADDRESS), never create another
    inside = inside.model_copy(update={"cluster": inside.cluster.model_copy(update={"submit": "jobs-api"})})
    storage.write_text(config, dump_config(inside))
    api = api or KubernetesRayJobs()
    api.create(job)
    emit(f"created RayJob {name} in namespace {getattr(api, 'namespace', '?')}: {job['spec']['entrypoint']}")
    status, logs = follow(api, name, emit, poll_s=poll_s)
    if status.get("jobDeploymentStatus") != "Complete" or status.get("jobStatus") != "SUCCEEDED":
        info = SimpleNamespace(status=f"{status.get('jobDeploymentStatus')}/{status.get('jobStatus') or '-'}",
                               message=status.get("message"), error_type=status.get("reason"))
        raise jobs.job_failure(f"{name} (RayJob)", info, logs)
    emit(f"RayJob {name} Complete")
    return result_of(logs)
