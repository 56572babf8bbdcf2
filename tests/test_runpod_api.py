"""RunPodAPI through the real runpod SDK against the loopback FakeRunPod."""

from __future__ import annotations

import pytest
import runpod
from runpod import error as rp_error

from jobs.runpod_api import FALLBACK_PRICES, RunPodAPI, gql_escape
from jobs.values import NoCapacityError, RunPodAuthError, RunPodRequestError
from storage.settings import Settings

GPUS = ["NVIDIA RTX A5000", "NVIDIA GeForce RTX 4090"]


@pytest.fixture()
def fake(fake_runpod_gql):
    return fake_runpod_gql


@pytest.fixture()
def api(fake):
    return RunPodAPI(Settings(_env_file=None, tuner_gpu_types=",".join(GPUS), tuner_cloud_types="SECURE,COMMUNITY"))


def test_fallback_to_next_gpu_and_cloud(fake, api):
    fake.capacity = {("NVIDIA GeForce RTX 4090", "COMMUNITY")}
    pod_id, choice = api.create_pod_with_fallback("run-1", "img:1", {"A": "b"})
    assert fake.create_attempts == [
        ("NVIDIA RTX A5000", "SECURE"), ("NVIDIA RTX A5000", "COMMUNITY"),
        ("NVIDIA GeForce RTX 4090", "SECURE"), ("NVIDIA GeForce RTX 4090", "COMMUNITY"),
    ]
    assert choice.gpu_type == "NVIDIA GeForce RTX 4090" and choice.cloud_type == "COMMUNITY"
    assert choice.price_per_hour == fake.prices["NVIDIA GeForce RTX 4090"][1]
    pod = fake.pods[pod_id]
    assert pod.name == "tuner-run-1" and pod.ports == "8000/http"
    assert fake.live_pods() == [pod_id]


def test_no_capacity_anywhere_lists_what_was_tried(fake, api):
    fake.capacity = set()
    with pytest.raises(NoCapacityError) as exc:
        api.create_pod_with_fallback("tuner-x", "img", {"TUNER_POD_TOKEN": "s3cret"})
    msg = str(exc.value)
    for gpu in GPUS:
        assert f"{gpu}/SECURE" in msg and f"{gpu}/COMMUNITY" in msg
    assert "no longer any instances" in msg
    assert "s3cret" not in msg  # the mutation text (with env) never leaks
    assert fake.live_pods() == []


def test_values_are_escaped_for_graphql(fake, api):
    nasty = 'say "hi"\nline2\\end\ttab'
    pod_id, _ = api.create_pod_with_fallback(
        'tuner-"q"', 'img"x', {"TRICKY": nasty}, docker_args='bash -c "echo \\"$X\\"\nls"'
    )
    pod = fake.pods[pod_id]
    assert pod.env["TRICKY"] == nasty
    assert pod.name == 'tuner-"q"' and pod.image == 'img"x'
    assert pod.docker_args == 'bash -c "echo \\"$X\\"\nls"'


def test_unescaped_value_is_a_syntax_error_in_the_fake(fake, api):
    # Control: the raw SDK pastes values unescaped, and the fake rejects that like RunPod.
    with pytest.raises(rp_error.QueryError, match="Syntax Error"):
        runpod.create_pod("tuner-raw", "img", "NVIDIA RTX A5000", env={"K": 'a"b'})
    assert fake.live_pods() == []
    assert gql_escape('a"b\n\\') == 'a\\"b\\n\\\\'


def test_get_list_terminate_idempotent(fake, api):
    pod_id, _ = api.create_pod_with_fallback("tuner-a", "img", {})
    assert api.get_pod(pod_id)["id"] == pod_id
    assert [p["id"] for p in api.list_pods()] == [pod_id]
    api.terminate_pod(pod_id)
    assert api.get_pod(pod_id) is None and api.list_pods() == []
    api.terminate_pod(pod_id)  # already gone: fine
    assert fake.live_pods() == []
    assert fake.billed_seconds(pod_id) >= 0


def test_prices_live_and_fallback(fake, api):
    assert api.gpu_prices() == {g: fake.prices[g][0] for g in GPUS}
    assert api.gpu_price("NVIDIA A40", "COMMUNITY") == (fake.prices["NVIDIA A40"][1], True)
    # A type the API doesn't know: built-in table, marked not live.
    fake.prices.pop("NVIDIA A40")
    assert api.gpu_price("NVIDIA A40") == (FALLBACK_PRICES["NVIDIA A40"], False)
    assert api.gpu_price("NVIDIA Imaginary") == (None, False)


def test_wrong_api_key_is_rejected(fake, monkeypatch):
    bad = RunPodAPI(Settings(_env_file=None, runpod_api_key="wrong"))
    with pytest.raises(RunPodAuthError, match="API key"):  # typed, not the SDK's class
        bad.list_pods()


def test_pod_url_from_template(fake, api):
    assert api.pod_url("abc") == f"{fake.base_url}/proxy/abc-8000"


def test_allowed_cuda_versions_and_disk_reach_runpod(fake, api):
    fake.host_cuda["NVIDIA RTX A5000"] = "12.4"  # older driver than the image needs
    pod_id, choice = api.create_pod_with_fallback(
        "run-7", "img", {}, container_disk_gb=70, allowed_cuda_versions=["12.8", "12.9"])
    assert choice.gpu_type == "NVIDIA GeForce RTX 4090"  # the A5000 host was refused
    pod = fake.pods[pod_id]
    assert pod.allowed_cuda == ["12.8", "12.9"] and pod.container_disk_gb == 70
    assert fake.create_attempts[0] == ("NVIDIA RTX A5000", "SECURE")
    with pytest.raises(RunPodRequestError, match="allowedCudaVersions"):
        api.create_pod_with_fallback("run-8", "img", {}, allowed_cuda_versions=["12.10"])
