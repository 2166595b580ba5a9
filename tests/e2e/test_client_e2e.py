"""The SDK against the real entry point (``python -m quotient_service.server``) as a subprocess,
run from a directory outside the repository so that only installed packages are used."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import quotient_client as qc


@pytest.fixture(scope="module")
def target(
    tiny_model_store: Path, pick_port: Callable[[], int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    port = pick_port()
    workdir = tmp_path_factory.mktemp("e2e-client")
    log = (workdir / "server.log").open("wb")
    argv = [
        sys.executable,
        "-m",
        "quotient_service.server",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--model-store",
        str(tiny_model_store),
    ]
    proc = subprocess.Popen(
        argv, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )  # its own process group, killed as a whole
    try:
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def test_embed_through_the_real_server(target: str, digits: Callable[[int], np.ndarray]) -> None:
    with qc.Client(target) as client:
        client.wait_for_serving(timeout=120)
        assert client.health() == "SERVING"
        images = [np.rot90(digits(1), k) for k in range(4)]
        vectors, poses = client.embed_images(images, batch_size=2, return_poses=True)
        np.testing.assert_allclose(vectors, np.repeat(vectors[:1], 4, axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose((poses - poses[0]) % 360, [0, 90, 180, 270])
        with pytest.raises(qc.InvalidInputError) as info:
            client.embed_images([*images, b"junk"], batch_size=2)
        assert info.value.index == 4


def test_waiting_for_a_server_that_is_not_there(pick_port: Callable[[], int]) -> None:
    client = qc.Client(f"127.0.0.1:{pick_port()}")
    with client, pytest.raises(qc.DeadlineExceededError, match="not SERVING after"):
        client.wait_for_serving(timeout=0.5)
