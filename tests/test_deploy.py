"""The Kubernetes and KServe manifests in deploy/: valid for a pinned Kubernetes, and true to the service.

There is no cluster here and no kustomize in the dev venv, so the kustomization is rendered by `render()`
below, which knows exactly the keys deploy/k8s/kustomization.yaml uses (resources, labels, images) and
refuses any other, and every object is validated with kubernetes-validate against Kubernetes 1.32's schemas
in strict mode (unknown fields fail). The KServe InferenceService and the KEDA ScaledObject are CRDs that
kubernetes-validate does not know: they are validated against deploy/kserve/inferenceservice.schema.json and
deploy/k8s/extras/scaledobject.schema.json, written for this project from KServe's and KEDA's API types, whose
Kubernetes fields (pod, container, HPA behavior) point into the same strict Kubernetes schemas.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from tests.helpers import ROOT

K8S_VERSION = "1.32.0"
DEPLOY = ROOT / "deploy"
KUSTOMIZATION = DEPLOY / "k8s"
INFERENCE_SERVICE = DEPLOY / "kserve" / "inferenceservice.yaml"
KSERVE_SCHEMA = DEPLOY / "kserve" / "inferenceservice.schema.json"
EXTRAS = KUSTOMIZATION / "extras"
SCALED_OBJECT = EXTRAS / "scaledobject-queue-depth.yaml"
KEDA_SCHEMA = EXTRAS / "scaledobject.schema.json"
KNOWN_KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "labels", "images"}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def render(folder: Path) -> list[dict[str, Any]]:
    """What `kustomize build folder` gives for the subset of kustomize this project uses."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KNOWN_KUSTOMIZE_KEYS
    assert not unknown, f"render() does not apply {sorted(unknown)}: teach it, or the test validates the wrong thing"
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    objects: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        path = folder / name
        assert path.is_file(), f"kustomization.yaml lists {name}, which does not exist"
        objects += _documents(path)
    for label in kustomization.get("labels", []):
        assert not label.get("includeSelectors") and not label.get("includeTemplates"), "only metadata labels"
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
    for image in kustomization.get("images", []):
        for obj in objects:
            for container in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    return objects


def _by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [obj["kind"] for obj in objects]
    assert len(kinds) == len(set(kinds)), kinds
    return {obj["kind"]: obj for obj in objects}


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def _mib(quantity: str) -> float:
    units = {"Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    return _by_kind(render(KUSTOMIZATION))


def test_kustomization_renders_the_four_objects_and_every_file_in_it_exists(rendered: dict[str, Any]) -> None:
    assert set(rendered) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    listed = set(yaml.safe_load((KUSTOMIZATION / "kustomization.yaml").read_text())["resources"])
    beside = {p.name for p in KUSTOMIZATION.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == beside, "a manifest beside kustomization.yaml that it does not list is never applied"
    container = rendered["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "car-classifier:0.1.0"
    assert rendered["Service"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "car-classifier"


def test_every_kubernetes_manifest_validates_strictly(rendered: dict[str, Any]) -> None:
    extras = [doc for path in sorted(EXTRAS.glob("*.yaml")) for doc in _documents(path)]
    # KEDA's ScaledObject is validated against its own schema (test_scaled_object_matches_the_keda_schema).
    kubernetes = [obj for obj in extras if obj["apiVersion"] != "keda.sh/v1alpha1"]
    assert [obj["kind"] for obj in kubernetes] == ["HorizontalPodAutoscaler"], "extras holds the queue-depth HPA"
    assert len(extras) - len(kubernetes) == 1, "and the KEDA ScaledObject"
    for obj in [*rendered.values(), *kubernetes]:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_strict_validation_catches_a_misspelt_field(rendered: dict[str, Any]) -> None:
    broken = copy.deepcopy(rendered["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/ready"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    wrong_type = copy.deepcopy(rendered["PodDisruptionBudget"])
    wrong_type["spec"]["maxUnavailable"] = [1]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_VERSION, strict=True)


def test_the_pieces_point_at_each_other(rendered: dict[str, Any]) -> None:
    deployment = rendered["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        rendered["Service"]["spec"]["selector"],
        rendered["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= pod_labels.items()
    target = rendered["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert rendered["Service"]["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}
    assert _env(container)["PORT"] == str(container["ports"][0]["containerPort"])
    # The PDB lets one pod go, and the HPA's floor keeps two answering meanwhile.
    assert (
        rendered["HorizontalPodAutoscaler"]["spec"]["minReplicas"]
        - rendered["PodDisruptionBudget"]["spec"]["maxUnavailable"]
        >= 2
    )


def _pod_contract(pod: dict[str, Any], container: dict[str, Any]) -> None:
    """What deploy/ promises about the pod, for the Deployment and the InferenceService alike."""
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000  # the Dockerfile's user
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # A read-only root with a writable /tmp for what a library may write there (uploads stay in memory).
    tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp and any(v["name"] == tmp[0]["name"] and "emptyDir" in v for v in pod["volumes"])
    env = _env(container)
    # THREADS follows the CPU limit through the cgroup quota (service/cpus.py); setting it would pin it.
    assert "THREADS" not in env and "WORKERS" not in env
    assert container["resources"]["requests"]["cpu"] == container["resources"]["limits"]["cpu"]
    # Above the 60 s idle timeout of common load balancers, so that they close idle connections first.
    assert int(env["TIMEOUT_KEEP_ALIVE_S"]) > 60
    probes = {kind: container[f"{kind}Probe"]["httpGet"]["path"] for kind in ("startup", "liveness", "readiness")}
    assert probes == {"startup": "/ping", "liveness": "/ping", "readiness": "/ready"}
    # The grace period covers the preStop pause and the longest request already accepted, body read included.
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    request_timeout = float(env.get("REQUEST_TIMEOUT_S", 30))
    body_read = float(env["REQUEST_READ_TIMEOUT_S"]) + 10 * 1024 * 1024 / int(env["MIN_UPLOAD_BYTES_PER_S"])
    assert body_read <= request_timeout, "a 10 MiB body must arrive within the request's deadline"
    assert pod["terminationGracePeriodSeconds"] >= pause + request_timeout + 5


def test_deployment_runs_unprivileged_and_drains_within_its_grace_period(rendered: dict[str, Any]) -> None:
    deployment = rendered["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    _pod_contract(pod, pod["containers"][0])
    # A rollout never lowers capacity: the new pod is ready before an old one drains.
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_every_setting_in_the_manifests_is_one_the_service_reads(rendered: dict[str, Any]) -> None:
    settings_source = (ROOT / "service" / "settings.py").read_text()
    containers = [
        rendered["Deployment"]["spec"]["template"]["spec"]["containers"][0],
        _documents(INFERENCE_SERVICE)[0]["spec"]["predictor"]["containers"][0],
    ]
    for container in containers:
        for name in _env(container):
            assert f'"{name}"' in settings_source, f"{name} is set in deploy/ but service/settings.py never reads it"
    assert _env(containers[0]) == _env(containers[1]), "the Deployment and the InferenceService configure alike"


def _crd_validator(schema_file: Path) -> jsonschema.protocols.Validator:
    """A validator for a CRD schema of ours whose Kubernetes fields refer to kubernetes-validate's strict schemas."""
    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / "v1.32.0-local-strict"
    definitions = json.loads((schemas / "_definitions.json").read_text())
    registry: Registry[Any] = Resource.from_contents(definitions) @ Registry()
    schema = json.loads(schema_file.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.fixture(scope="module")
def kserve_validator() -> jsonschema.protocols.Validator:
    return _crd_validator(KSERVE_SCHEMA)


def test_inference_service_matches_the_kserve_schema(kserve_validator: jsonschema.protocols.Validator) -> None:
    (isvc,) = _documents(INFERENCE_SERVICE)
    kserve_validator.validate(isvc)
    predictor = isvc["spec"]["predictor"]
    _pod_contract(predictor, predictor["containers"][0])
    assert predictor["containers"][0]["name"] == "kserve-container"
    # A custom container: protocolVersion belongs to the model-format runtimes, whichever protocols it speaks.
    assert "protocolVersion" not in json.dumps(isvc)


@pytest.mark.parametrize(
    "path, value",
    [
        (("spec", "predictor", "minReplica"), 3),  # misspelt extension field
        (("spec", "predictor", "scaleMetric"), "queue"),  # not one of KServe's metrics
        (("spec", "predictor", "containers", 0, "imagePullPolcy"), "Always"),  # misspelt container field
        (("spec", "predictor", "containers", 0, "name"), "classifier"),  # no kserve-container
        (("spec", "predictor", "terminationGracePeriodSeconds"), "45"),  # pod field of the wrong type
        (("spec", "predicter"), {}),
    ],
)
def test_the_kserve_schema_rejects_what_kserve_would(
    kserve_validator: jsonschema.protocols.Validator, path: tuple[str | int, ...], value: object
) -> None:
    (isvc,) = _documents(INFERENCE_SERVICE)
    _set(isvc, path, value)
    with pytest.raises(jsonschema.ValidationError):
        kserve_validator.validate(isvc)


@pytest.fixture(scope="module")
def keda_validator() -> jsonschema.protocols.Validator:
    return _crd_validator(KEDA_SCHEMA)


def test_scaled_object_matches_the_keda_schema(keda_validator: jsonschema.protocols.Validator) -> None:
    (scaled,) = _documents(SCALED_OBJECT)
    keda_validator.validate(scaled)


def _set(obj: dict[str, Any], path: tuple[str | int, ...], value: object) -> None:
    node: Any = obj
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value


@pytest.mark.parametrize(
    "path, value",
    [
        (("spec", "minReplicas"), 3),  # the HPA's spelling, not KEDA's
        (("spec", "minReplicaCount"), "3"),  # a string where KEDA reads an int32
        (("spec", "scaleTargetRef", "name"), None),  # no target
        (("spec", "triggers", 0, "metadata", "treshold"), "3"),  # misspelt scaler key
        (("spec", "triggers", 0, "metadata", "threshold"), 3),  # metadata is a string map
        (("spec", "triggers", 0, "metadata", "threshold"), None),  # the Prometheus scaler needs one
        (("spec", "triggers", 0, "metadata", "ignoreNullValues"), "no"),  # KEDA parses a bool
        (("spec", "triggers", 1, "metricType"), "Value"),  # the CPU scaler takes Utilization or AverageValue
        (("spec", "fallback", "behavior"), "currentReplicasIfBigger"),  # not one of KEDA's behaviours
        (("spec", "advanced", "horizontalPodAutoscalerConfig", "behavior", "scaleup"), {}),  # strict HPA schema
        (("spec", "advanced", "horizontalPodAutoscalerConfig", "behavior", "scaleDown", "policies", 0, "value"), "1"),
    ],
)
def test_the_keda_schema_rejects_what_keda_would(
    keda_validator: jsonschema.protocols.Validator, path: tuple[str | int, ...], value: object
) -> None:
    (scaled,) = _documents(SCALED_OBJECT)
    _set(scaled, path, value)
    with pytest.raises(jsonschema.ValidationError):
        keda_validator.validate(scaled)


def test_scaled_object_takes_over_the_cpu_hpa_and_keeps_its_figures(rendered: dict[str, Any]) -> None:
    """What KEDA's admission webhook checks against a cluster, checked against the manifests instead."""
    (scaled,) = _documents(SCALED_OBJECT)
    spec, hpa = scaled["spec"], rendered["HorizontalPodAutoscaler"]
    deployment = rendered["Deployment"]
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "car-classifier")
    assert target["name"] == deployment["metadata"]["name"] == hpa["spec"]["scaleTargetRef"]["name"]
    # Two HPAs on one Deployment fight, and KEDA creates one: the ScaledObject is never applied with hpa.yaml ...
    listed = yaml.safe_load((KUSTOMIZATION / "kustomization.yaml").read_text())["resources"]
    assert not any(name.startswith("extras") for name in listed)
    # ... but adopts hpa.yaml's HPA when applied over it, which KEDA allows only for the HPA it names.
    assert scaled["metadata"]["annotations"]["scaledobject.keda.sh/transfer-hpa-ownership"] == "true"
    hpa_config = spec["advanced"]["horizontalPodAutoscalerConfig"]
    assert hpa_config["name"] == hpa["metadata"]["name"]
    # The same floor, ceiling, behaviour and CPU target as hpa.yaml (whose target the capacity plan checks).
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (
        hpa["spec"]["minReplicas"],
        hpa["spec"]["maxReplicas"],
    )
    assert hpa_config["behavior"] == hpa["spec"]["behavior"]
    triggers = {trigger["type"]: trigger for trigger in spec["triggers"]}
    assert set(triggers) == {"prometheus", "cpu"}
    cpu_target = hpa["spec"]["metrics"][0]["resource"]["target"]
    assert triggers["cpu"]["metricType"] == cpu_target["type"] == "Utilization"
    assert int(triggers["cpu"]["metadata"]["value"]) == cpu_target["averageUtilization"]
    # KEDA's fallback needs a non-CPU trigger with an AverageValue target; an empty answer must count as a failure.
    queue = triggers["prometheus"]
    assert queue["metricType"] == "AverageValue"
    assert spec["fallback"]["replicas"] >= spec["minReplicaCount"]
    assert queue["metadata"]["ignoreNullValues"] == "false"
    # The query reads a gauge the service exports, under the scrape job deploy/prometheus/rules.yml selects.
    query = queue["metadata"]["query"]
    assert (
        "inference_queue_depth{" in query and '"inference_queue_depth"' in (ROOT / "service" / "metrics.py").read_text()
    )
    assert (
        'job="car-classifier"' in query and 'job="car-classifier"' in (DEPLOY / "prometheus" / "rules.yml").read_text()
    )
    assert query.startswith("sum("), "KEDA needs one number: the queue of all the pods, divided by the threshold"


def _capacity(tmp_path: Path, results: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "benchmarks.capacity", "--results", str(results), "--out", str(tmp_path), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_capacity_plan_traces_to_the_committed_results(tmp_path: Path, rendered: dict[str, Any]) -> None:
    results = ROOT / "benchmarks" / "results"
    run = _capacity(tmp_path, results, "--rps", "1000", "--p99-ms", "300")
    assert run.returncode == 0, run.stderr
    plan = json.loads((tmp_path / "capacity.json").read_text())
    assert (tmp_path / "capacity.md").read_text().count("| 1000 req/s |") == 1
    latest = json.loads((results / "latest.json").read_text())
    service = next(s for s in latest["systems"] if s["system"] == "service-int8")
    inputs = plan["inputs"]
    assert inputs["replica_rps"]["value"] == service["ok_per_s"]
    assert inputs["replica_cores"]["value"] == latest["machine"]["cores_available"]
    p = plan["plan"]
    assert p["replica_rps_at_saturation"] <= service["ok_per_s"]
    assert p["replicas"] == math.ceil(1000 / (p["replica_rps_at_saturation"] * p["utilization"])) + 1
    assert p["cores"] == p["replicas"] * latest["machine"]["cores_available"]
    assert p["estimated_p99_ms"] <= 300
    assert [row["rps"] for row in plan["scales"]] == [1000, 10000, 100000]
    # The manifests carry the plan's per-replica figures.
    container = rendered["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    memory = plan["memory_per_replica"]
    assert _mib(container["resources"]["requests"]["memory"]) == memory["request_mib"]
    assert _mib(container["resources"]["limits"]["memory"]) == memory["limit_mib"]
    assert float(container["resources"]["limits"]["cpu"]) == inputs["replica_cores"]["value"]
    assert int(_env(container)["MAX_CONNECTIONS"]) == plan["settings"]["MAX_CONNECTIONS"]
    hpa_target = rendered["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["resource"]["target"]
    assert hpa_target["averageUtilization"] == p["hpa_cpu_target_percent"]


def test_capacity_plan_follows_its_input_file(tmp_path: Path) -> None:
    source = ROOT / "benchmarks" / "results"
    halved = tmp_path / "results"
    halved.mkdir()
    latest = json.loads((source / "latest.json").read_text())
    for system in latest["systems"]:
        system["ok_per_s"] = round(system["ok_per_s"] / 2, 2)
    (halved / "latest.json").write_text(json.dumps(latest))
    (halved / "saturation.json").write_text((source / "saturation.json").read_text())
    runs = [
        _capacity(tmp_path / name, folder, "--rps", "1000", "--p99-ms", "300")
        for name, folder in (("full", source), ("half", halved))
    ]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    full, half = (json.loads((tmp_path / name / "capacity.json").read_text())["plan"] for name in ("full", "half"))
    assert half["replica_rps_at_saturation"] == round(full["replica_rps_at_saturation"] / 2, 2)
    assert half["replicas"] > 1.8 * full["replicas"]


def test_capacity_refuses_a_target_no_replica_count_can_meet(tmp_path: Path) -> None:
    run = _capacity(tmp_path, ROOT / "benchmarks" / "results", "--rps", "1000", "--p99-ms", "40")
    assert run.returncode == 2
    assert "more replicas cannot help" in run.stderr
    assert not (tmp_path / "capacity.json").exists()
