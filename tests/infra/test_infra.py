"""Checks of infra/: launcher YAML, KubeRay and Kubernetes manifests, Dockerfile.

No network and no cluster: the cluster launcher configs go through the JSON schema shipped
inside the installed ray package and through Ray's own config preparation; the manifests
and the Dockerfile are parsed and checked for the shape DESIGN.md asks for (head takes no
work, CPU stream nodes offer `stream`, GPU nodes offer GPUs), for one image
everywhere, and for `selfsup` command lines that name real subcommands.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "Dockerfile"
DOCKERIGNORE = INFRA / "Dockerfile.dockerignore"
CLUSTER_YAMLS = {"aws": INFRA / "aws" / "cluster.yaml", "gcp": INFRA / "gcp" / "cluster.yaml"}

# The selfsup CLI's subcommands (jobs/cli.py).
SUBCOMMANDS = {
    "pretrain", "evaluate", "retrain", "submit", "shards", "runs", "demo", "bench", "jobs", "export"
}

# Every document of every manifest, in order: (apiVersion, kind).
K8S_FILES = {
    "raycluster.yaml": [("v1", "ServiceAccount"), ("ray.io/v1", "RayCluster")],
    "rayjob-pretrain.yaml": [("ray.io/v1", "RayJob")],
    "rayjob-evaluate.yaml": [("ray.io/v1", "RayJob")],
    "cronjob-retrain.yaml": [("batch/v1", "CronJob")],
}

# KubeRay appends suffixes to these names for Services and generated clusters.
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "CronJob": 52, "ServiceAccount": 253}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

GPU_MACHINE = {"aws": ("InstanceType", "p5.48xlarge"), "gcp": ("machineType", "a3-highgpu-8g")}
IMAGE_RE = re.compile(r"^\S+/selfsup:\S+$")


# ---------------------------------------------------------------- loading


def load_yaml(path: Path) -> Any:
    """Parse one YAML document."""
    with open(path) as f:
        return yaml.safe_load(f)


def k8s_docs(name: str) -> list[dict]:
    """Parse every non-empty document of infra/k8s/<name>."""
    with open(K8S / name) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def k8s_kind(kind: str) -> list[dict]:
    """Every manifest document of one kind, across all files."""
    return [d for name in K8S_FILES for d in k8s_docs(name) if d.get("kind") == kind]


def only(docs: list[dict], name: str) -> dict:
    """The one document named `name`."""
    hits = [d for d in docs if d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one document named {name!r}, found {len(hits)}"
    return hits[0]


def ray_pin() -> str:
    """The ray version pinned in constraints.txt."""
    text = (ROOT / "constraints.txt").read_text()
    match = re.search(r"^ray==(\S+)$", text, re.M)
    assert match, "constraints.txt pins no ray version"
    return match.group(1)


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    """The cluster-config schema shipped inside the installed ray package."""
    path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------- walking manifests


def pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod spec) for every pod template in a RayCluster, RayJob or CronJob."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind == "RayCluster":
        yield from cluster_pod_specs(spec, "RayCluster")
    elif kind == "RayJob":
        if "rayClusterSpec" in spec:
            yield from cluster_pod_specs(spec["rayClusterSpec"], "RayJob.rayClusterSpec")
        if "submitterPodTemplate" in spec:
            yield "RayJob.submitterPodTemplate", spec["submitterPodTemplate"]["spec"]
    elif kind == "CronJob":
        yield "CronJob", spec["jobTemplate"]["spec"]["template"]["spec"]


def cluster_pod_specs(spec: dict, where: str) -> Iterator[tuple[str, dict]]:
    """(where, pod spec) for the head and every worker group of a RayClusterSpec."""
    yield f"{where}.head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"{where}.{group['groupName']}", group["template"]["spec"]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) for the RayCluster and every RayJob that brings its own."""
    specs = [(f"RayCluster/{d['metadata']['name']}", d["spec"]) for d in k8s_kind("RayCluster")]
    for job in k8s_kind("RayJob"):
        if "rayClusterSpec" in job["spec"]:
            specs.append((f"RayJob/{job['metadata']['name']}", job["spec"]["rayClusterSpec"]))
    return specs


def custom_resources(group: dict) -> dict[str, float]:
    """Ray custom resources a KubeRay group offers, from either place KubeRay reads them."""
    found = {k: float(v) for k, v in group.get("resources", {}).items()}
    raw = group.get("rayStartParams", {}).get("resources")
    if raw is not None:
        # KubeRay form: a JSON object inside a quoted, escaped string: '"{\"x\": 1}"'.
        decoded = json.loads(raw)
        if isinstance(decoded, str):
            decoded = json.loads(decoded)
        found.update({k: float(v) for k, v in decoded.items()})
    return found


def gpu_limit(pod_spec: dict) -> int:
    """nvidia.com/gpu limit summed over the pod's containers."""
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for c in pod_spec["containers"]
    )


def k8s_images() -> list[tuple[str, str]]:
    """(where, image) for every container of every manifest."""
    found = []
    for name in K8S_FILES:
        for doc in k8s_docs(name):
            for where, pod in pod_specs(doc):
                found += [(f"{name}:{where}", c.get("image", "")) for c in pod["containers"]]
    return found


# ---------------------------------------------------------------- the Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined."""
    joined, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        joined.append(current + stripped)
        current = ""
    out = []
    for text in joined:
        word, _, rest = text.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    """argv of a CMD/ENTRYPOINT in JSON (exec) or shell form."""
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def dockerfile_workdir() -> str:
    """The last WORKDIR of the Dockerfile."""
    workdirs = [a for i, a in dockerfile_instructions() if i == "WORKDIR"]
    assert workdirs, "Dockerfile sets no WORKDIR"
    return workdirs[-1]


def copy_sources() -> list[str]:
    """Every local source path of the Dockerfile's COPY lines."""
    sources = []
    for instruction, args in dockerfile_instructions():
        if instruction != "COPY":
            continue
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        sources += [p.rstrip("/") for p in parts[:-1]]
    return sources


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether Docker's ignore rules (last match wins, `!` re-includes) drop `path`."""
    prefixes = ["/".join(path.split("/")[: i + 1]) for i in range(path.count("/") + 1)]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


# ---------------------------------------------------------------- selfsup command lines


def selfsup_subcommand(argv: list[str]) -> str | None:
    """The subcommand of the `selfsup` invocation inside argv (None for `selfsup --help`)."""
    starts = [i for i, token in enumerate(argv) if os.path.basename(token) == "selfsup"]
    assert starts, f"no selfsup invocation in {argv}"
    for token in argv[starts[0] + 1 :]:
        if not token.startswith("-"):
            return token
    return None


def selfsup_argv(argv: list[str]) -> list[str]:
    """argv from the `selfsup` token on."""
    start = next(i for i, t in enumerate(argv) if os.path.basename(t) == "selfsup")
    return argv[start:]


def command_lines() -> list[tuple[str, list[str]]]:
    """(where, argv) of every selfsup command line in infra/: RayJobs, CronJobs, Dockerfile."""
    lines = []
    for job in k8s_kind("RayJob"):
        argv = shlex.split(job["spec"]["entrypoint"])
        lines.append((f"RayJob/{job['metadata']['name']}", argv))
    for cron in k8s_kind("CronJob"):
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        for c in pod["containers"]:
            argv = list(c.get("command", [])) + list(c.get("args", []))
            lines.append((f"CronJob/{cron['metadata']['name']}/{c['name']}", argv))
    for instruction, args in dockerfile_instructions():
        if instruction in ("CMD", "ENTRYPOINT"):
            lines.append((f"Dockerfile {instruction}", exec_form(args)))
    return lines


def option_value(argv: list[str], option: str) -> str:
    """The value following `option` in argv."""
    assert option in argv, f"{option} missing from {argv}"
    index = argv.index(option)
    assert index + 1 < len(argv), f"{option} has no value in {argv}"
    return argv[index + 1]


# ================================================================ cluster launcher


@pytest.mark.parametrize("cloud", sorted(CLUSTER_YAMLS))
def test_cluster_yaml_validates_against_ray_schema(cloud: str, ray_schema: dict) -> None:
    config = load_yaml(CLUSTER_YAMLS[cloud])
    validator = jsonschema.Draft7Validator(ray_schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(config)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("cloud", sorted(CLUSTER_YAMLS))
def test_cluster_yaml_survives_rays_own_preparation(cloud: str) -> None:
    """`ray up` fills in provider defaults and re-validates; our keys must win over them."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml(CLUSTER_YAMLS[cloud])
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["provider"]["type"] == cloud
    commands = [
        cmd
        for key in ("head_setup_commands", "worker_setup_commands", "setup_commands")
        for cmd in prepared.get(key, [])
    ]
    # Ray's defaults pip-install a nightly wheel over the image's pinned ray.
    assert not [c for c in commands if "ray-wheels" in c or "pip install -U" in c], commands


def node_types(cloud: str) -> tuple[dict, str, dict]:
    """(config, head type name, available_node_types) of one cluster YAML."""
    config = load_yaml(CLUSTER_YAMLS[cloud])
    return config, config["head_node_type"], config["available_node_types"]


@pytest.mark.parametrize("cloud", sorted(CLUSTER_YAMLS))
def test_cluster_head_takes_no_work(cloud: str) -> None:
    _, head, types = node_types(cloud)
    resources = types[head]["resources"]
    assert resources.get("CPU") == 0, f"head must advertise CPU: 0, has {resources}"
    assert not resources.get("GPU"), f"head must offer no GPU, has {resources}"
    assert "stream" not in resources
    node_config = types[head]["node_config"]
    assert "InstanceMarketOptions" not in node_config, "head must be on-demand"
    assert not node_config.get("scheduling", {}).get("preemptible"), "head must be on-demand"
    assert node_config.get("scheduling", {}).get("provisioningModel") != "SPOT"


def is_spot(cloud: str, node_config: dict) -> bool:
    """Whether a node_config asks for spot / preemptible capacity."""
    if cloud == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling", {})
    return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True


@pytest.mark.parametrize("cloud", sorted(CLUSTER_YAMLS))
def test_cluster_cpu_stream_group_offers_stream_on_spot(cloud: str) -> None:
    _, head, types = node_types(cloud)
    streams = {n: t for n, t in types.items() if t["resources"].get("stream", 0) > 0}
    assert streams, f"no node type offers the custom resource stream: {list(types)}"
    for name, node_type in streams.items():
        assert name != head
        assert not node_type["resources"].get("GPU"), f"{name}: streams belong on CPU nodes"
        assert node_type["resources"].get("CPU", 0) > 0, f"{name}: streams need CPUs"
        assert is_spot(cloud, node_type["node_config"]), f"{name} must run on spot capacity"


@pytest.mark.parametrize("cloud", sorted(CLUSTER_YAMLS))
def test_cluster_gpu_group_is_h100_and_offers_no_streams(cloud: str) -> None:
    _, head, types = node_types(cloud)
    gpus = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpus, f"no node type offers GPUs: {list(types)}"
    key, machine = GPU_MACHINE[cloud]
    for name, node_type in gpus.items():
        assert name != head
        assert node_type["node_config"][key] == machine
        assert node_type["resources"]["GPU"] == 8, f"{machine} has 8 GPUs"
        assert "stream" not in node_type["resources"], f"{name}: no streams on GPU nodes"


@pytest.mark.parametrize("cloud", sorted(CLUSTER_YAMLS))
def test_cluster_worker_bounds(cloud: str) -> None:
    config, head, types = node_types(cloud)
    workers = {n: t for n, t in types.items() if n != head}
    assert workers
    for name, node_type in workers.items():
        low, high = node_type.get("min_workers", 0), node_type["max_workers"]
        assert 0 <= low <= high, f"{name}: min_workers {low} > max_workers {high}"
        assert high <= config["max_workers"], f"{name}: max_workers above the global cap"
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0, "idle nodes must scale down"


@pytest.mark.parametrize("cloud", sorted(CLUSTER_YAMLS))
def test_cluster_token_auth_reads_a_mounted_file(cloud: str) -> None:
    config = load_yaml(CLUSTER_YAMLS[cloud])
    options = " ".join(config["docker"]["run_options"])
    assert "-e RAY_AUTH_MODE=token" in options
    match = re.search(r"-e RAY_AUTH_TOKEN_PATH=(\S+)", options)
    assert match, "RAY_AUTH_TOKEN_PATH not set in the container"
    token_path = match.group(1)
    mounts = re.findall(r"-v (\S+):(\S+):ro", options)
    assert any(token_path.startswith(dst + "/") for _, dst in mounts), "token dir not mounted ro"
    host_dirs = {src for src, dst in mounts if token_path.startswith(dst + "/")}
    fetch = " ".join(config["initialization_commands"])
    assert any(d in fetch for d in host_dirs), "initialization_commands never write the token"
    assert "RAY_AUTH_TOKEN=" not in options, "the token itself must not be in the config"


# ================================================================ Kubernetes manifests


@pytest.mark.parametrize("name", sorted(K8S_FILES))
def test_k8s_documents_have_expected_kinds_and_names(name: str) -> None:
    docs = k8s_docs(name)
    assert [(d.get("apiVersion"), d.get("kind")) for d in docs] == K8S_FILES[name]
    for doc in docs:
        meta_name = doc.get("metadata", {}).get("name", "")
        assert DNS1035.match(meta_name), f"{doc['kind']} name {meta_name!r} is not DNS-1035"
        assert len(meta_name) <= NAME_LIMITS[doc["kind"]], f"{meta_name!r} too long"
        if doc["kind"] != "ServiceAccount":
            assert isinstance(doc.get("spec"), dict) and doc["spec"], f"{meta_name}: no spec"


@pytest.mark.parametrize("name", sorted(K8S_FILES))
def test_k8s_pods_have_image_identity_and_nonroot_user(name: str) -> None:
    checked = 0
    for doc in k8s_docs(name):
        for where, pod in pod_specs(doc):
            checked += 1
            assert pod.get("containers"), f"{where}: no containers"
            for container in pod["containers"]:
                assert container.get("name") and container.get("image"), f"{where}: {container}"
            assert pod.get("serviceAccountName") == "selfsup-ray", f"{where}: workload identity"
            assert pod.get("securityContext", {}).get("runAsNonRoot") is True, where
    assert checked, f"{name} defines no pod templates"


def test_service_account_is_defined_once_and_used() -> None:
    accounts = k8s_kind("ServiceAccount")
    assert [a["metadata"]["name"] for a in accounts] == ["selfsup-ray"]
    annotations = accounts[0]["metadata"].get("annotations", {})
    assert set(annotations) & {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"}


@pytest.mark.parametrize(
    "where,spec", [pytest.param(w, s, id=w) for w, s in ray_cluster_specs()]
)
def test_ray_cluster_spec_shape(where: str, spec: dict) -> None:
    assert spec["rayVersion"] == ray_pin(), f"{where}: rayVersion differs from constraints.txt"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling off"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token auth off"

    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: head must take no work"
    assert gpu_limit(head["template"]["spec"]) == 0, f"{where}: head must have no GPU"

    groups = spec["workerGroupSpecs"]
    streams = [g for g in groups if custom_resources(g).get("stream", 0) > 0]
    gpus = [g for g in groups if gpu_limit(g["template"]["spec"]) > 0]
    assert streams, f"{where}: no worker group offers stream"
    assert gpus, f"{where}: no worker group requests nvidia.com/gpu"
    assert all(gpu_limit(g["template"]["spec"]) == 0 for g in streams), "streams on GPU pods"
    assert all("stream" not in custom_resources(g) for g in gpus), "streams on GPU pods"

    for group in [head, *groups]:
        label = group.get("groupName", "head")
        # KubeRay rejects resources in both places and labels in rayStartParams.
        params = group.get("rayStartParams", {})
        assert not (group.get("resources") and "resources" in params), f"{where}.{label}"
        assert "labels" not in params, f"{where}.{label}: use the top-level labels field"
        # Autoscaler v2 requires restartPolicy Never or unset.
        assert group["template"]["spec"].get("restartPolicy", "Never") == "Never", label
    for group in groups:
        low, high = group["minReplicas"], group["maxReplicas"]
        assert 0 <= low <= group.get("replicas", low) <= high, f"{where}.{group['groupName']}"


def test_pretrain_rayjob_brings_and_removes_its_cluster() -> None:
    job = only(k8s_kind("RayJob"), "selfsup-pretrain")["spec"]
    assert "rayClusterSpec" in job and "clusterSelector" not in job
    assert job["shutdownAfterJobFinishes"] is True
    assert job.get("ttlSecondsAfterFinished", 0) >= 0
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "selfsup" and selfsup_subcommand(argv) == "pretrain"


def test_evaluate_rayjob_watches_on_the_shared_cluster() -> None:
    job = only(k8s_kind("RayJob"), "selfsup-evaluate")["spec"]
    cluster_names = {c["metadata"]["name"] for c in k8s_kind("RayCluster")}
    assert "rayClusterSpec" not in job
    assert job["clusterSelector"].get("ray.io/cluster") in cluster_names
    # KubeRay never deletes a selected cluster and rejects a TTL without shutdown.
    assert job.get("shutdownAfterJobFinishes", False) is False
    assert job.get("ttlSecondsAfterFinished", 0) == 0
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "selfsup" and selfsup_subcommand(argv) == "evaluate"
    assert "--watch" in argv
    assert set(option_value(argv, "--methods").split(",")) <= {"knn", "linear"}
    eval_set = option_value(argv, "--eval-set")
    assert re.fullmatch(r"[\w.-]+=(s3|gs)://\S+,(s3|gs)://\S+", eval_set), eval_set
    assert re.fullmatch(r"(s3|gs)://\S+", selfsup_argv(argv)[2]), "RUN_URL must be a bucket URL"


def test_cronjob_retrain_submits_to_the_shared_cluster() -> None:
    cron = only(k8s_kind("CronJob"), "selfsup-retrain")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert len(cron["schedule"].split()) == 5, f"not a cron schedule: {cron['schedule']}"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    argv = list(container.get("command", [])) + list(container.get("args", []))
    tail = selfsup_argv(argv)
    assert selfsup_subcommand(tail) == "retrain"
    assert int(option_value(tail, "--min-new-samples")) > 0
    # The driver must run inside the cluster: submitted to the RayCluster's head service.
    (cluster,) = k8s_kind("RayCluster")
    assert argv[:3] == ["ray", "job", "submit"], argv
    head_service = f"http://{cluster['metadata']['name']}-head-svc:8265"
    assert option_value(argv, "--address") == head_service


def submitter_containers() -> list[tuple[str, dict, dict]]:
    """(where, container, pod spec) of every pod that talks to the shared cluster."""
    found = []
    for job in k8s_kind("RayJob"):
        if "clusterSelector" in job["spec"]:
            pod = job["spec"]["submitterPodTemplate"]["spec"]
            found += [(f"RayJob/{job['metadata']['name']}", c, pod) for c in pod["containers"]]
    for cron in k8s_kind("CronJob"):
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        found += [(f"CronJob/{cron['metadata']['name']}", c, pod) for c in pod["containers"]]
    return found


def test_submitters_read_the_cluster_token_from_its_secret() -> None:
    (cluster,) = k8s_kind("RayCluster")
    secret = cluster["spec"]["authOptions"]["secretName"]
    submitters = submitter_containers()
    assert len(submitters) >= 2
    for where, container, pod in submitters:
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
        token_path = env["RAY_AUTH_TOKEN_PATH"]["value"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = [
            m
            for m in container.get("volumeMounts", [])
            if token_path.startswith(m["mountPath"] + "/")
        ]
        assert mounts, f"{where}: {token_path} is not under a mounted volume"
        assert volumes[mounts[0]["name"]]["secret"]["secretName"] == secret, where


def test_no_credentials_in_manifests_or_configs() -> None:
    forbidden = re.compile(
        r"AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|GOOGLE_APPLICATION_CREDENTIALS"
        r"|private_key|AKIA[0-9A-Z]{16}"
    )
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        hits = forbidden.findall(path.read_text())
        assert not hits, f"{path.relative_to(ROOT)} mentions {hits}"
    for cloud, path in CLUSTER_YAMLS.items():
        assert "gcp_credentials" not in load_yaml(path)["provider"], f"{cloud}: key in config"
    for name in K8S_FILES:
        for doc in k8s_docs(name):
            for where, pod in pod_specs(doc):
                for container in pod["containers"]:
                    for var in container.get("env", []):
                        if "TOKEN" in var["name"] and var["name"] != "RAY_AUTH_TOKEN_PATH":
                            assert "value" not in var, f"{name}:{where}: {var['name']} in clear"


# ================================================================ one image, real commands


def test_one_image_everywhere() -> None:
    images = list(k8s_images())
    for cloud, path in CLUSTER_YAMLS.items():
        config = load_yaml(path)
        docker = config["docker"]
        keys = [k for k in ("image", "head_image", "worker_image") if k in docker]
        images += [(f"{cloud}:docker.{k}", docker[k]) for k in keys]
        for name, node_type in config["available_node_types"].items():
            if "worker_image" in node_type.get("docker", {}):
                images.append((f"{cloud}:{name}", node_type["docker"]["worker_image"]))
    sources = {where.split(":")[0] for where, _ in images}
    assert {"aws", "gcp", *K8S_FILES} <= sources, f"images missing from {sources}"
    distinct = {image for _, image in images}
    assert len(distinct) == 1, f"images differ: {sorted(images)}"
    (image,) = distinct
    assert IMAGE_RE.match(image), f"{image!r} is not <registry>/selfsup:<tag>"
    assert image in (INFRA / "README.md").read_text(), "README's substitution misses the image"


@pytest.mark.parametrize("where,argv", [pytest.param(w, a, id=w) for w, a in command_lines()])
def test_selfsup_command_lines_use_known_subcommands(where: str, argv: list[str]) -> None:
    sub = selfsup_subcommand(argv)
    if sub is None:
        assert {"--help", "-h"} & set(argv), f"{where}: selfsup without subcommand: {argv}"
    else:
        valid = sorted(SUBCOMMANDS)
        assert sub in SUBCOMMANDS, f"{where}: unknown subcommand {sub!r} (valid: {valid})"


def test_subcommand_set_matches_the_cli() -> None:
    cli = pytest.importorskip("selfsup.jobs.cli")
    assert SUBCOMMANDS == set(cli.COMMANDS), "infra's subcommand list drifted from jobs/cli.py"


def test_command_lines_cover_pretrain_evaluate_retrain() -> None:
    subs = {selfsup_subcommand(argv) for _, argv in command_lines()}
    assert {"pretrain", "evaluate", "retrain"} <= subs


def test_config_paths_point_into_the_image_source_tree() -> None:
    workdir = dockerfile_workdir().rstrip("/")
    configs = []
    for where, argv in command_lines():
        tail = selfsup_argv(argv)
        if selfsup_subcommand(tail) in ("pretrain", "retrain"):
            configs.append((where, tail[2]))
    assert configs
    available = sorted((ROOT / "jobs" / "configs").rglob("*.yaml"))
    for where, config in configs:
        assert config.startswith(workdir + "/jobs/configs/"), f"{where}: {config} not in the image"
    if not available:
        pytest.skip("jobs/configs/ holds no configs yet")
    for where, config in configs:
        assert (ROOT / config[len(workdir) + 1 :]).is_file(), f"{where}: {config} does not exist"


# ================================================================ Dockerfile


def test_dockerfile_base_matches_pinned_ray() -> None:
    froms = [a for i, a in dockerfile_instructions() if i == "FROM"]
    args = dict(
        a.split("=", 1) for i, a in dockerfile_instructions() if i == "ARG" and "=" in a
    )
    assert len(froms) == 1
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), froms[0])
    assert f":{ray_pin()}-py311" in base, f"base {base!r} does not carry ray {ray_pin()} / py311"
    assert "gpu" in base or "cu12" in base or "cuda" in base, f"base {base!r} is not CUDA-capable"


def test_dockerfile_installs_the_packages_with_constraints() -> None:
    sources = copy_sources()
    needed_sources = ("pyproject.toml", "constraints.txt", "README.md", "selfsup", "pipeline", "trainers", "jobs")
    for needed in needed_sources:
        assert needed in sources, f"Dockerfile never copies {needed}"
    runs = [a for i, a in dockerfile_instructions() if i == "RUN" and "pip install" in a]
    installs = [
        shlex.split(cmd.split("pip install", 1)[1])
        for run in runs
        for cmd in re.split(r"&&|;", run)
        if "pip install" in cmd
    ]
    project = [argv for argv in installs if "." in argv or any(a.startswith(".[") for a in argv)]
    assert project, f"no `pip install ... .` among {installs}"
    for argv in installs:
        assert "-c" in argv and argv[argv.index("-c") + 1] == "constraints.txt", argv
        extras = {e for a in argv if a.startswith(".[") for e in a[2:-1].split(",")}
        # the clouds' extras (gs:// on infra/gcp, MLflow tracking); never the test or export tools
        assert extras <= {"gcs", "mlflow"}, f"extras installed: {argv}"
        assert "-e" not in argv and "--editable" not in argv, f"editable install: {argv}"
    assert any("gcs" in {e for a in argv if a.startswith(".[") for e in a[2:-1].split(",")} for argv in project), \
        "the image cannot read gs:// (infra/gcp) without the gcs extra"


def test_dockerfile_runs_as_nonroot_without_entrypoint() -> None:
    instructions = dockerfile_instructions()
    users = [a for i, a in instructions if i == "USER"]
    assert users, "Dockerfile never sets USER"
    assert users[-1].split(":")[0] not in ("root", "0"), f"runs as {users[-1]}"
    # The launcher runs `docker run IMAGE bash`; an ENTRYPOINT would turn it into `selfsup bash`.
    assert not [a for i, a in instructions if i == "ENTRYPOINT"]
    cmds = [exec_form(a) for i, a in instructions if i == "CMD"]
    assert cmds and cmds[-1][0] == "selfsup", f"CMD should run selfsup: {cmds}"


def test_dockerignore_keeps_sources_and_drops_the_rest() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for source in copy_sources():
        assert not dockerignore_excludes(source, patterns), f"{source} is ignored but COPYed"
    for package in ("selfsup", "pipeline", "trainers", "jobs"):
        module = f"{package}/sub/module.py"
        assert not dockerignore_excludes(module, patterns), f"{module} would miss the image"
    assert not dockerignore_excludes("jobs/configs/simclr_image.yaml", patterns)
    for junk in (".git/HEAD", ".venv/bin/python", "tests/infra/test_infra.py", "runs/x/state.pt",
                 "pipeline/__pycache__/a.pyc", "jobs/cli.pyc"):
        assert dockerignore_excludes(junk, patterns), f"{junk} would enter the build context"
