"""``--decode-in processes``: inputs decoded in worker processes answer exactly as decoded in the
server's threads, through the public gRPC API: the same embeddings, the same per-item errors and
notes; a worker that dies is replaced and costs no request. The committed models."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

pytest.importorskip("rdkit", reason="molecule models need RDKit (make install-molecules)")

from quotient_client import Client, InvalidInputError

SMILES = ["CCO", "c1ccccc1", "OC(=O)C1CC1", "C[C@H](N)O", "N#CC(F)=O", "CC(C)(C)C"]


@pytest.fixture(scope="module")
def services(start_service, one_model_per_modality):
    store = str(one_model_per_modality)
    return start_service(model_store=store), start_service(model_store=store, decode_in="processes")


def workers(svc) -> list[int]:
    return svc.app.engine._pool.worker_pids


def embed_both(services, fn):
    out = []
    for svc in services:
        with Client(svc.target) as client:
            out.append(fn(client))
    return out


def test_molecules_and_images_embed_as_in_threads(services, digits):
    mol, img = "qm9-vae", "rotmnist-c8"
    threads, processes = embed_both(services, lambda c: c.embed(SMILES, model=mol))
    np.testing.assert_array_equal(threads.vectors, processes.vectors)
    assert [n.kind for n in processes.notes[3]] == [n.kind for n in threads.notes[3]] != []
    images = [digits(s) for s in range(5)]
    threads, processes = embed_both(services, lambda c: c.embed_images(images, model=img))
    np.testing.assert_array_equal(threads, processes)


def test_a_bad_item_is_named_with_its_reason(services):
    mol = "qm9-vae"
    with Client(services[1].target) as client, pytest.raises(InvalidInputError) as info:
        client.embed_molecules(["CCO", "C1CC", "CC"], model=mol)
    assert info.value.index == 1 and "unparsable" in str(info.value).lower()


def test_a_killed_worker_is_replaced_without_failing_a_request(services):
    mol = "qm9-vae"
    with Client(services[1].target) as client:
        before = client.embed_molecules(SMILES, model=mol)
        killed = workers(services[1])
        assert len(killed) == services[1].settings.decode_threads
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        after = client.embed_molecules(SMILES, model=mol)
    np.testing.assert_array_equal(before, after)
    assert set(workers(services[1])) - set(killed)  # replaced when next used
    assert workers(services[0]) == []  # decode_in threads: no worker processes
