"""The cpu container image, built and run for real with podman (``make image``): health SERVING,
a real Embed of an image and of a molecule through the container's port, a non-root user, a
read-only root filesystem with every capability dropped, the OCI labels and the licence, and a
clean stop on SIGTERM. The container shares the host's network but binds loopback only.

Prints the image size and the time from ``podman run`` to SERVING (closing-note figures)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from quotient_client import Client

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
IMAGE = "quotient:cpu"
ENV = {**os.environ, "CONTAINERS_CONF": str(REPO / "deploy" / "podman" / "containers.conf")}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, env=ENV, check=check, timeout=timeout
    )


@pytest.fixture(scope="module")
def image() -> dict:
    if shutil.which("podman") is None:
        pytest.fail("podman is missing: make test installs it (Debian podman)")
    build = subprocess.run(
        ["make", "-C", str(REPO), "image", "TARGET=cpu"],
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (info,) = json.loads(podman("image", "inspect", IMAGE).stdout)
    print(f"\n{IMAGE}: {info['Size'] / 1e6:.0f} MB")
    return info


@pytest.fixture(scope="module")
def container(image, pick_port) -> Iterator[dict]:
    name = f"quotient-test-{os.getpid()}"
    port, metrics = pick_port(), pick_port()
    started = time.monotonic()
    podman(
        "run", "-d", "--name", name, "--network", "host", "--read-only", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges", "--no-healthcheck", "--tmpfs", "/tmp",
        "-e", "QUOTIENT_HOST=127.0.0.1", "-e", f"QUOTIENT_PORT={port}",
        "-e", "QUOTIENT_METRICS_HOST=127.0.0.1", "-e", f"QUOTIENT_METRICS_PORT={metrics}",
        "-e", "QUOTIENT_DRAIN_S=1", IMAGE,
    )  # fmt: skip
    try:
        with Client(f"127.0.0.1:{port}") as client:
            client.wait_for_serving(timeout=120)
        ready = time.monotonic() - started
        print(f"\npodman run → SERVING: {ready:.1f} s")
        yield {"name": name, "port": port, "metrics": metrics, "ready_s": ready}
    finally:
        logs = podman("logs", name, check=False).stdout
        podman("rm", "-f", "-t", "0", name, check=False)
        print(logs[-3000:])


def test_the_image_is_labelled_and_carries_the_licence(image) -> None:
    config = image["Config"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.version"]
    assert labels["org.opencontainers.image.source"]
    assert config["User"] == "10001:10001"
    assert image["Healthcheck"]["Test"] == ["CMD", "quotient-probe"]
    licence = podman("run", "--rm", "--network", "none", "--entrypoint", "cat", IMAGE,
                     "/opt/quotient/share/doc/LICENSE").stdout  # fmt: skip
    assert "Apache License" in licence and "Version 2.0" in licence


def test_the_image_has_no_torch_no_java_no_compiler(image) -> None:
    script = (
        "import importlib.util as u, shutil;"
        "print([m for m in ('torch', 'escnn', 'torch_geometric', 'ts') if u.find_spec(m)],"
        "[c for c in ('gcc', 'cc', 'g++', 'java', 'pip', 'pip3') if shutil.which(c)])"
    )
    out = podman("run", "--rm", "--network", "none", "--entrypoint", "python3", IMAGE, "-c", script)
    assert out.stdout.strip() == "[] []", out.stdout


def test_the_container_serves_images_and_molecules(container, digits) -> None:
    with Client(f"127.0.0.1:{container['port']}") as client:
        names = [m.name for m in client.list_models()]
        assert names == ["druglike-vae", "qm9-vae", "rotmnist-c8"]
        image = digits(3)
        a, b = client.embed_images([image, np.rot90(image).copy()], model="rotmnist-c8")
        assert float(np.abs(a - b).max()) < 1e-4  # invariant through the container
        ethanol = client.embed_molecules(["CCO", "OCC"], model="qm9-vae")
        np.testing.assert_allclose(ethanol[0], ethanol[1], atol=1e-6)
        aspirin = ["CC(=O)Oc1ccccc1C(=O)O", "OC(=O)c1ccccc1OC(C)=O"]
        drug = client.embed_molecules(aspirin, model="druglike-vae")
        np.testing.assert_allclose(drug[0], drug[1], atol=1e-6)
        assert client.decode(ethanol[:1], model="qm9-vae")[0].smiles == "CCO"


def test_the_container_runs_as_an_unprivileged_user(container) -> None:
    pid = podman("inspect", "-f", "{{.State.Pid}}", container["name"]).stdout.strip()
    status = Path(f"/proc/{pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert set(uids) == {"10001"}, uids
    caps = next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1]
    assert int(caps, 16) == 0
    probe = podman("exec", container["name"], "quotient-probe", check=False)
    assert probe.returncode == 0 and "SERVING" in probe.stdout


def test_the_container_stops_cleanly_on_sigterm(container) -> None:
    """Last: podman stop sends SIGTERM; the server drains (1 s) and exits 0 well before the
    30 s after which podman would SIGKILL it (exit code 137)."""
    began = time.monotonic()
    podman("stop", "-t", "30", container["name"], timeout=60)
    took = time.monotonic() - began
    code = podman("inspect", "-f", "{{.State.ExitCode}}", container["name"]).stdout.strip()
    logs = podman("logs", container["name"]).stdout + podman("logs", container["name"]).stderr
    assert code == "0", logs[-2000:]
    assert "draining" in logs and "stopped" in logs
    assert took < 25, f"stop took {took:.1f} s"
