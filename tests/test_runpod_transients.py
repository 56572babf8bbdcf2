"""RunPod API transients through the real runpod SDK against FakeRunPod's real failure
answers (tests/fakes/runpod_faults.py): retried, typed, never read as "no capacity", and a
create whose answer is lost never makes a second pod."""

from __future__ import annotations

import itertools
import logging
import time

import pytest
import requests

from jobs.reaper import reap
from jobs.runpod_api import FALLBACK_PRICES, RunPodAPI
from jobs.runpod_retry import RetryPolicy, classify, retry_after_seconds
from jobs.values import (
    NoCapacityError,
    RunPodAuthError,
    RunPodError,
    RunPodRequestError,
    RunPodTransientError,
)
from storage.settings import Settings
from tests.fakes.runpod_faults import (
    NO_CAPACITY_MESSAGES,
    cloudflare_rate_limited,
    dropped,
    graphql_error,
    html_error,
    lost,
    rate_limited,
)

GPUS = ["NVIDIA RTX A5000", "NVIDIA GeForce RTX 4090"]
SECRET = "s3cret-token-value"


@pytest.fixture()
def fake(fake_runpod_gql):
    return fake_runpod_gql


def make_api(**kw) -> RunPodAPI:
    base: dict[str, object] = {
        "_env_file": None, "tuner_gpu_types": ",".join(GPUS), "tuner_cloud_types": "SECURE,COMMUNITY",
        "tuner_runpod_backoff_s": 0.01, "tuner_runpod_backoff_max_s": 3.0,
    }
    base.update(kw)
    return RunPodAPI(Settings(**base))  # type: ignore[arg-type]


@pytest.fixture()
def api(fake):
    return make_api()


def create_times(fake) -> list[float]:
    return [t for t, op, _ in fake.gql_log if op == "create"]


# ----------------------------------------------------------------------- create
@pytest.mark.parametrize("fault", [rate_limited(1), cloudflare_rate_limited(1)],
                         ids=["problem+json", "cloudflare-1015"])
def test_429_during_create_waits_retry_after_same_gpu_one_pod(fake, api, fault):
    fake.fail("create", fault, times=2)
    pod_id, choice = api.create_pod_with_fallback("tuner-run-7", "img", {"TUNER_POD_TOKEN": SECRET})
    # not "no capacity": the same (first) GPU and cloud, one pod, made by the third request
    assert (choice.gpu_type, choice.cloud_type) == (GPUS[0], "SECURE")
    assert fake.live_pods() == [pod_id] and fake.create_attempts == [(GPUS[0], "SECURE")]
    t = create_times(fake)
    assert len(t) == 3
    assert min(b - a for a, b in itertools.pairwise(t)) >= 0.9  # Retry-After: 1 honoured (backoff is 0.01)


@pytest.mark.parametrize("answer", [lost(html_error(502)), lost(html_error(524)), lost(dropped())],
                         ids=["html-502", "html-524", "dropped"])
def test_create_answer_lost_after_pod_exists_is_adopted_by_name(fake, api, answer):
    fake.fail("create", answer)
    pod_id, choice = api.create_pod_with_fallback("tuner-run-8", "img", {"TUNER_POD_TOKEN": SECRET})
    assert list(fake.pods) == [pod_id] and fake.live_pods() == [pod_id]  # exactly one pod
    assert fake.create_attempts == [(GPUS[0], "SECURE")] and fake.gql_count("create") == 1
    assert (choice.gpu_type, choice.cloud_type) == (GPUS[0], "SECURE")


def test_graphql_internal_error_on_create_is_retried_not_no_capacity(fake, api):
    fake.fail("create", graphql_error(path="podFindAndDeployOnDemand"))
    pod_id, choice = api.create_pod_with_fallback("tuner-run-9", "img", {})
    assert (choice.gpu_type, choice.cloud_type) == (GPUS[0], "SECURE")
    assert fake.live_pods() == [pod_id] and fake.gql_count("create") == 2


def test_gpu_precheck_transient_is_retried(fake, api):
    # create_pod asks gpuTypes first (runpod 1.12.0 ctl_commands.create_pod -> get_gpu)
    fake.fail("gpuTypes", html_error(503))
    _pod_id, choice = api.create_pod_with_fallback("tuner-run-10", "img", {})
    assert choice.gpu_type == GPUS[0] and len(fake.pods) == 1


@pytest.mark.parametrize("message", NO_CAPACITY_MESSAGES)
def test_each_real_no_capacity_message_moves_to_the_next_gpu(fake, api, message):
    fake.no_capacity_message = message
    fake.capacity = {(GPUS[1], "COMMUNITY")}
    _pod_id, choice = api.create_pod_with_fallback("tuner-run-11", "img", {})
    assert (choice.gpu_type, choice.cloud_type) == (GPUS[1], "COMMUNITY")
    assert len(fake.create_attempts) == 4 and len(fake.pods) == 1


def test_persistent_5xx_gives_up_as_transient_never_no_capacity(fake):
    api = make_api(tuner_runpod_attempts=3)
    fake.fail("create", html_error(503), seconds=60)
    with pytest.raises(RunPodTransientError) as exc:
        api.create_pod_with_fallback("tuner-run-12", "img", {"TUNER_POD_TOKEN": SECRET})
    assert not isinstance(exc.value, NoCapacityError)
    assert "HTTP 503" in str(exc.value) and "3 tries" in str(exc.value)
    assert SECRET not in str(exc.value) and exc.value.__context__ is None
    assert fake.gql_count("create") == 3 and fake.pods == {}  # same candidate only, no pod


def test_unknown_graphql_error_is_a_request_error_not_no_capacity(fake, api):
    fake.fail("create", graphql_error("Invalid input: gpuCount must be positive", code=None))
    with pytest.raises(RunPodRequestError, match="gpuCount") as exc:
        api.create_pod_with_fallback("tuner-run-13", "img", {"TUNER_POD_TOKEN": SECRET})
    assert not isinstance(exc.value, NoCapacityError) and SECRET not in str(exc.value)
    assert fake.gql_count("create") == 1 and fake.pods == {}  # no other GPU tried


def test_lost_create_and_unreadable_pod_list_gives_up_then_reaper_removes_it(fake, api, project_db):
    fake.fail("create", lost(html_error(524)))
    fake.fail("pods", html_error(502), seconds=60)
    with pytest.raises(RunPodTransientError, match="unknown"):
        api.create_pod_with_fallback("tuner-run-14", "img", {})
    assert len(fake.pods) == 1 and fake.gql_count("create") == 1  # never created twice
    fake.clear_faults()
    (pod_id,) = fake.live_pods()
    assert reap(project_db, api, creation_window_s=0) == [pod_id] and fake.live_pods() == []


def test_stale_pod_with_same_name_but_other_token_is_not_adopted(fake, api):
    old, _ = api.create_pod_with_fallback("tuner-run-15", "img", {"TUNER_POD_TOKEN": "old"})
    assert api.find_pod("tuner-run-15", {"TUNER_POD_TOKEN": "old"}) == old
    assert api.find_pod("tuner-run-15", {"TUNER_POD_TOKEN": "new"}) is None
    fake.fail("create", html_error(502))  # not created: the lookup must not take `old`
    new, _ = api.create_pod_with_fallback("tuner-run-15", "img", {"TUNER_POD_TOKEN": "new"})
    assert new != old and sorted(fake.live_pods()) == sorted([old, new])


# ------------------------------------------------------------------------ prices
def test_price_lookup_survives_a_429(fake, api):
    fake.fail("gpuTypes", rate_limited(1))
    assert api.gpu_price(GPUS[0]) == (fake.prices[GPUS[0]][0], True)


def test_price_outage_falls_back_to_list_price_quickly(fake, api):
    fake.fail("gpuTypes", rate_limited(1), seconds=120)
    t0 = time.monotonic()
    assert api.gpu_price(GPUS[0]) == (FALLBACK_PRICES[GPUS[0]], False)
    assert api.gpu_price(GPUS[1]) == (FALLBACK_PRICES[GPUS[1]], False)
    assert api.gpu_prices() == {}
    assert time.monotonic() - t0 < 10
    assert fake.gql_count("gpuTypes") == 3  # one round of retries, then the outage is known


# --------------------------------------------------------------- get/terminate
def test_terminate_answered_429_is_retried_until_the_pod_is_gone(fake, api):
    pod_id, _ = api.create_pod_with_fallback("tuner-run-16", "img", {})
    fake.fail("terminate", rate_limited(1))
    api.terminate_pod(pod_id)  # the SDK ignores the 429 body: we must not
    assert fake.live_pods() == [] and fake.gql_count("terminate") == 2


def test_terminated_pod_reads_as_gone(fake, api):
    pod_id, _ = api.create_pod_with_fallback("tuner-run-17", "img", {})
    api.terminate_pod(pod_id)
    assert fake.pods[pod_id].status == "TERMINATED"  # still listed by RunPod ...
    assert api.get_pod(pod_id) is None and api.find_pod("tuner-run-17") is None  # ... gone to us
    api.terminate_pod(pod_id)  # "pod not found to terminate": fine


def test_get_pod_retries_transients_and_types_auth(fake, api):
    pod_id, _ = api.create_pod_with_fallback("tuner-run-18", "img", {})
    fake.fail("pod", lost(dropped()))
    fake.fail("pod", html_error(520))
    assert api.get_pod(pod_id)["id"] == pod_id
    with pytest.raises(RunPodAuthError):
        make_api(runpod_api_key="wrong").get_pod(pod_id)


def test_no_secret_in_errors_or_logs(fake, api, caplog):
    caplog.set_level(logging.DEBUG)
    fake.fail("create", lost(html_error(502)))
    fake.fail("create", graphql_error(f"weird {'x' * 500}", code=None))
    fake.capacity = set()
    with pytest.raises(RunPodError):
        api.create_pod_with_fallback("tuner-run-19", "img", {"TUNER_POD_TOKEN": SECRET})
    assert SECRET not in caplog.text and "mutation" not in caplog.text


# --------------------------------------------------------------- classification
def test_retry_after_forms():
    assert retry_after_seconds("12") == 12.0
    assert retry_after_seconds("garbage") is None and retry_after_seconds(None) is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after_seconds(date) <= 31


def test_timeouts_and_resets_are_transient():
    for exc in (requests.exceptions.ReadTimeout(), requests.exceptions.ConnectionError()):
        assert isinstance(classify(exc, None, "x"), RunPodTransientError)
    assert classify(RuntimeError("our bug"), None, "x") is None  # not RunPod's: re-raised


def test_backoff_is_bounded_and_honours_retry_after():
    p = RetryPolicy(attempts=5, base_s=1.0, max_s=8.0)
    assert p.delay(0, retry_after=3.0) == 3.0 and p.delay(0, retry_after=100.0) == 8.0
    assert all(p.delay(n) <= 8.0 for n in range(10)) and 0.5 <= p.delay(0) <= 1.0

