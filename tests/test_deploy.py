"""builder.deploy: runpod.yaml validation, dry run, create and update through the runpod SDK (stubbed)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import runpod
import yaml
from runpod.error import QueryError

from builder import deploy

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "runpod.yaml"
HTTP_CONFIG = ROOT / "runpod.http.yaml"
SDK_FUNCTIONS = ("get_endpoints", "create_template", "create_endpoint", "update_endpoint_template")


def repo_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "runpod.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def no_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call into the RunPod API fails the test."""
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the RunPod API was called")

    for name in SDK_FUNCTIONS:
        monkeypatch.setattr(runpod, name, forbidden)
    monkeypatch.setattr(runpod.api.graphql, "run_graphql_query", forbidden)
    monkeypatch.setattr(deploy.requests, "post", forbidden)


class FakeSDK:
    def __init__(self, endpoints: list[dict]) -> None:
        self.endpoints = endpoints
        self.calls: list[tuple[str, dict]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(runpod, "api_key", None)  # deploy sets it; restored after the test
        monkeypatch.setattr(runpod, "get_endpoints", self.get_endpoints)
        monkeypatch.setattr(runpod, "create_template", self.create_template)
        monkeypatch.setattr(runpod, "create_endpoint", self.create_endpoint)
        monkeypatch.setattr(runpod, "update_endpoint_template", self.update_endpoint_template)

    def get_endpoints(self) -> list[dict]:
        self.calls.append(("get_endpoints", {}))
        return self.endpoints

    def create_template(self, **kwargs: object) -> dict:
        self.calls.append(("create_template", kwargs))
        return {"id": "tpl-new", "name": kwargs["name"]}

    def create_endpoint(self, **kwargs: object) -> dict:
        self.calls.append(("create_endpoint", kwargs))
        return {"id": "ep-new"}

    def update_endpoint_template(self, **kwargs: object) -> dict:
        self.calls.append(("update_endpoint_template", kwargs))
        return {"id": kwargs["endpoint_id"], "templateId": kwargs["template_id"]}

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def kwargs(self, name: str) -> dict:
        return next(kwargs for called, kwargs in self.calls if called == name)


def test_repository_config_validates() -> None:
    config = deploy.load_config(CONFIG)
    assert config.flashboot
    assert "CSM_MODEL_DIR" not in config.env  # the worker finds the image's model itself
    assert deploy.SECRET_REFERENCE.match(config.env["CSM_WATERMARK_KEY"])
    assert all(deploy.POOL_MEMORY_GB[g] >= 24 for g in config.gpu_ids)


def _set(path: str, value: object):
    def change(data: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            data = data[key]
        data[last] = value
    return change


def _delete(path: str):
    def change(data: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            data = data[key]
        del data[last]
    return change


INVALID = {
    "literal watermark key": (_set("env.CSM_WATERMARK_KEY", "1,2,3,4,5"),
                              "CSM_WATERMARK_KEY must be a RunPod secret reference"),
    "literal token": (_set("env.HF_TOKEN", "hf_abc"), "HF_TOKEN must be a RunPod secret reference"),
    "unknown GPU pool": (_set("gpu_ids", ["ADA_24", "RTX_4090"]), "unknown GPU pool 'RTX_4090'"),
    "GPU too small": (_set("gpu_ids", ["AMPERE_16"]), "AMPERE_16 has 16 GB"),
    "no GPU": (_set("gpu_ids", []), "gpu_ids"),
    "workers reversed": (_set("workers", {"min": 5, "max": 2}), "min (5) is larger than max (2)"),
    "too many workers": (_set("workers.max", 1000), "workers.max"),
    "latest tag": (_set("image", "ghcr.io/your-org/csm-runpod-worker:latest"), ":latest"),
    "untagged image": (_set("image", "ghcr.io/your-org/csm-runpod-worker"), "image"),
    "missing field": (_delete("execution_timeout_s"), "execution_timeout_s: Field required"),
    "typo in a field": (_set("idle_timeout", 5), "idle_timeout: Extra inputs are not permitted"),
    "zero idle timeout": (_set("idle_timeout_s", 0), "idle_timeout_s"),
    "old CUDA": (_set("allowed_cuda_versions", ["12.4"]), "CUDA 12.4 is too old"),
    "missing watermark key": (_delete("env.CSM_WATERMARK_KEY"), "missing CSM_WATERMARK_KEY"),
    "literal bucket key": (_set("env.BUCKET_SECRET_ACCESS_KEY", "abc123"),
                           "BUCKET_SECRET_ACCESS_KEY must be a RunPod secret reference"),
    "quote in env": (_set("env.CSM_LOG_LEVEL", 'IN"FO'), "quote"),
    "bad concurrency": (_set("env.CSM_MAX_CONCURRENCY", "0"), "CSM_MAX_CONCURRENCY"),
    "two GPUs": (_set("gpu_count", 2), "gpu_count"),
}


@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_invalid_config_is_refused(case: str, tmp_path: Path, no_api: None,
                                   capsys: pytest.CaptureFixture) -> None:
    change, message = INVALID[case]
    data = copy.deepcopy(repo_config())
    change(data)
    assert deploy.main(["--config", str(write(tmp_path, data)), "--dry-run"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("deploy: error: ")
    assert message in err


def test_refusals_never_echo_a_credential(tmp_path: Path, no_api: None, capsys: pytest.CaptureFixture) -> None:
    data = repo_config()
    data["env"]["HF_TOKEN"] = 'hf_sec"ret'
    assert deploy.main(["--config", str(write(tmp_path, data)), "--dry-run"]) == 1
    assert "hf_sec" not in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_calls_nothing(no_api: None, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    assert deploy.main(["--config", str(CONFIG), "--dry-run"]) == 0
    out = capsys.readouterr().out
    plan = yaml.safe_load(out.split("\nexecution timeout:")[0])
    template, endpoint = plan.values()
    config = repo_config()
    assert template["image_name"] == config["image"] and template["is_serverless"] is True
    assert template["env"]["CSM_WATERMARK_KEY"] == "{{ RUNPOD_SECRET_csm_watermark_key }}"
    assert endpoint["name"] == config["name"] and endpoint["flashboot"] is True
    assert endpoint["gpu_ids"] == ",".join(config["gpu_ids"])
    assert "nothing was sent" in out


def test_missing_api_key(no_api: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    assert deploy.main(["--config", str(CONFIG)]) == 1
    err = capsys.readouterr().err
    assert "RUNPOD_API_KEY is not set" in err


def test_creates_template_and_endpoint_when_none_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    sdk = FakeSDK(endpoints=[{"id": "ep-other", "name": "something-else"}])
    sdk.install(monkeypatch)
    monkeypatch.setenv("RUNPOD_API_KEY", "rp_test_key")
    assert deploy.main(["--config", str(CONFIG)]) == 0
    assert sdk.names() == ["get_endpoints", "create_template", "create_endpoint"]
    assert runpod.api_key == "rp_test_key"
    config = repo_config()
    template = sdk.kwargs("create_template")
    assert template["name"].startswith(f"{config['name']}-")
    assert template == {
        "name": template["name"], "image_name": config["image"],
        "container_disk_in_gb": config["container_disk_gb"], "env": config["env"],
        "is_serverless": True, "registry_auth_id": None,
    }
    assert sdk.kwargs("create_endpoint") == {
        "name": config["name"], "template_id": "tpl-new",
        "gpu_ids": ",".join(config["gpu_ids"]), "gpu_count": 1,
        "allowed_cuda_versions": ",".join(config["allowed_cuda_versions"]),
        "idle_timeout": config["idle_timeout_s"],
        "scaler_type": config["scaler"]["type"], "scaler_value": config["scaler"]["value"],
        "workers_min": config["workers"]["min"], "workers_max": config["workers"]["max"],
        "flashboot": True,
    }


def test_updates_the_existing_endpoint(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    config = repo_config()
    existing = {"id": "ep-live", "name": f"{config['name']} -fb", "templateId": "tpl-old",
                "gpuIds": "ADA_24", "workersMin": config["workers"]["min"],
                "workersMax": config["workers"]["max"], "idleTimeout": config["idle_timeout_s"]}
    sdk = FakeSDK(endpoints=[existing])
    sdk.install(monkeypatch)
    monkeypatch.setenv("RUNPOD_API_KEY", "rp_test_key")
    assert deploy.main(["--config", str(CONFIG)]) == 0
    assert sdk.names() == ["get_endpoints", "create_template", "update_endpoint_template"]
    assert sdk.kwargs("update_endpoint_template") == {"endpoint_id": "ep-live", "template_id": "tpl-new"}
    out = capsys.readouterr().out
    assert "note: gpuIds is 'ADA_24'" in out  # drift the SDK cannot fix is reported
    assert "workersMin" not in out


def test_api_refusal_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    sdk = FakeSDK(endpoints=[])
    sdk.install(monkeypatch)

    def refuse(**_: object) -> dict:
        raise QueryError("Template name must be unique")

    monkeypatch.setattr(runpod, "create_template", refuse)
    monkeypatch.setenv("RUNPOD_API_KEY", "rp_test_key")
    assert deploy.main(["--config", str(CONFIG)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "deploy: error: RunPod refused the request: Template name must be unique"


# ---- the load-balancing endpoint (runpod.http.yaml) ---------------------------------------------
def test_http_config_validates_and_sets_mode_and_ports(no_api: None) -> None:
    config = deploy.load_config(HTTP_CONFIG)
    assert (config.type, config.http.port, config.http.health) == ("load_balancer", 8000, 8000)
    template = deploy.template_request(config, deploy.datetime(2026, 1, 2, 3, 4, 5))
    assert template["ports"] == "8000/http"
    env = template["env"]
    assert (env["CSM_MODE"], env["PORT"], env["PORT_HEALTH"]) == ("http", "8000", "8000")
    assert env["CSM_WATERMARK_KEY"] == "{{ RUNPOD_SECRET_csm_watermark_key }}"
    data = yaml.safe_load(HTTP_CONFIG.read_text())
    data["http"]["health_port"] = 8001
    config = deploy.EndpointConfig.model_validate(data)
    assert deploy.template_request(config, deploy.datetime.now())["ports"] == "8000/http,8001/http"
    queue = deploy.template_request(deploy.load_config(CONFIG), deploy.datetime.now())
    assert "ports" not in queue and "CSM_MODE" not in queue["env"]


HTTP_INVALID = {
    "queue scaler": (_set("scaler.type", "QUEUE_DELAY"), "scales by REQUEST_COUNT"),
    "port by hand": (_set("env.PORT", "80"), "PORT: set from `type` and `http`"),
    "mode by hand": (_set("env.CSM_MODE", "queue"), "CSM_MODE: set from `type` and `http`"),
    "bad port": (_set("http.port", 70000), "http.port"),
    "http on a queue endpoint": (_set("type", "queue"), "http: only for type load_balancer"),
    "unknown type": (_set("type", "pod"), "type"),
}


@pytest.mark.parametrize("case", HTTP_INVALID, ids=list(HTTP_INVALID))
def test_invalid_http_config_is_refused(case: str, tmp_path: Path, no_api: None,
                                        capsys: pytest.CaptureFixture) -> None:
    change, message = HTTP_INVALID[case]
    data = yaml.safe_load(HTTP_CONFIG.read_text())
    change(data)
    assert deploy.main(["--config", str(write(tmp_path, data)), "--dry-run"]) == 1
    assert message in capsys.readouterr().err


def test_http_dry_run_shows_a_load_balancer(no_api: None, capsys: pytest.CaptureFixture) -> None:
    assert deploy.main(["--config", str(HTTP_CONFIG), "--dry-run"]) == 0
    out = capsys.readouterr().out
    template, endpoint = yaml.safe_load(out.split("\ndry run:")[0]).values()
    assert template["ports"] == "8000/http" and template["env"]["CSM_MODE"] == "http"
    assert (endpoint["type"], endpoint["scalerType"]) == ("LB", "REQUEST_COUNT")
    assert endpoint["executionTimeoutMs"] == 330_000 and "execution timeout:" not in out


class FakeGraphQL:
    """RunPod's GraphQL API as requests.post sees it (the SDK cannot create this type)."""

    def __init__(self, status: int = 200, body: dict | None = None) -> None:
        self.status, self.body = status, body or {"data": {"saveEndpoint": {"id": "ep-lb"}}}
        self.posts: list[dict] = []

    def post(self, url: str, json: dict, headers: dict, timeout: float) -> object:
        self.posts.append({"url": url, "json": json, "headers": headers})
        status, body = self.status, self.body

        class Reply:
            status_code = status

            @staticmethod
            def json() -> dict:
                return body

        return Reply()


def test_creates_a_load_balancing_endpoint(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    sdk, graphql = FakeSDK(endpoints=[]), FakeGraphQL()
    sdk.install(monkeypatch)
    monkeypatch.setattr(deploy.requests, "post", graphql.post)
    monkeypatch.setenv("RUNPOD_API_KEY", "rp_test_key")
    monkeypatch.delenv("RUNPOD_API_BASE_URL", raising=False)
    assert deploy.main(["--config", str(HTTP_CONFIG)]) == 0
    assert sdk.names() == ["get_endpoints", "create_template"]  # not the SDK's create_endpoint
    assert sdk.kwargs("create_template")["ports"] == "8000/http"
    (post,) = graphql.posts
    assert post["url"] == "https://api.runpod.io/graphql"
    assert post["headers"] == {"Authorization": "Bearer rp_test_key"}
    assert "saveEndpoint(input: $input)" in post["json"]["query"]
    fields = post["json"]["variables"]["input"]
    assert (fields["type"], fields["templateId"], fields["scalerType"]) == (
        "LB", "tpl-new", "REQUEST_COUNT")
    assert fields["name"] == "csm-1b-tts-http" and fields["flashBootType"] == "FLASHBOOT"
    out = capsys.readouterr().out
    assert "created load-balancing endpoint csm-1b-tts-http (ep-lb)" in out
    assert "https://ep-lb.api.runpod.ai/v1/audio/speech" in out


def test_graphql_refusal_is_one_clear_line(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    FakeSDK(endpoints=[]).install(monkeypatch)
    graphql = FakeGraphQL(body={"errors": [{"message": "type LB is not enabled"}]})
    monkeypatch.setattr(deploy.requests, "post", graphql.post)
    monkeypatch.setenv("RUNPOD_API_KEY", "rp_test_key")
    assert deploy.main(["--config", str(HTTP_CONFIG)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "deploy: error: RunPod refused the request: type LB is not enabled"


def hub_file(name: str) -> dict:
    return json.loads((ROOT / ".runpod" / name).read_text())


def test_hub_listing_agrees_with_runpod_yaml() -> None:
    hub, config = hub_file("hub.json"), deploy.load_config(CONFIG)
    assert (hub["type"], hub["category"], hub["config"]["runsOn"]) == ("serverless", "audio", "GPU")
    assert hub["config"]["gpuIds"] == ",".join(config.gpu_ids)
    assert hub["config"]["allowedCudaVersions"] == config.allowed_cuda_versions
    assert hub["config"]["containerDiskInGb"] == config.container_disk_gb
    env = {entry["key"]: entry for entry in hub["config"]["env"]}
    # The Hub builds the slim image: nothing pins the model folder, the user brings the model.
    assert "CSM_MODEL_DIR" not in env
    assert env["CSM_MODEL_REPO"]["input"]["default"] == "sesame/csm-1b"
    for secret in ("CSM_WATERMARK_KEY", "HF_TOKEN", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY"):
        assert "value" not in env[secret] and env[secret]["input"]["default"] == "", secret


def test_hub_test_job_is_a_short_valid_generation() -> None:
    from worker.schema import SpeechRequest, parse_request
    from worker.settings import Limits

    tests = hub_file("tests.json")
    assert tests["config"]["gpuCount"] == 1 and tests["tests"]
    for case in tests["tests"]:
        request = parse_request(case["input"], Limits())
        assert isinstance(request, SpeechRequest)
        assert request.max_audio_length_ms is not None and request.max_audio_length_ms <= 5000
