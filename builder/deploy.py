"""Create or update the RunPod template and serverless endpoint that runpod.yaml describes.

    python -m builder.deploy [--config runpod.yaml] [--dry-run]

Each deploy creates a new template (named <name>-<UTC time>, since template names must be unique)
and then either creates the endpoint or points the existing endpoint of that name at the new
template. The API key comes from RUNPOD_API_KEY. --dry-run prints both and calls nothing.

`type: queue` (runpod.yaml) is RunPod's job queue; `type: load_balancer` (runpod.http.yaml)
sends requests straight to the worker's HTTP server: the template then runs CSM_MODE=http on
`http.port` with its health check on `http.health_port`, and the endpoint is created with
RunPod's GraphQL API directly, since the SDK's create_endpoint cannot ask for that type.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import requests
import runpod
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from runpod.error import AuthenticationError, QueryError

# RunPod serverless GPU pools and their memory (GB). CSM-1B needs about 4 GB for bf16 weights,
# Mimi and KV caches; 24 GB is the floor we test and size for (concurrent streams, compile workspaces).
POOL_MEMORY_GB = {
    "AMPERE_16": 16, "AMPERE_24": 24, "ADA_24": 24, "ADA_32_PRO": 32, "AMPERE_48": 48,
    "ADA_48_PRO": 48, "AMPERE_80": 80, "ADA_80_PRO": 80, "HOPPER_141": 141,
}
MIN_GPU_MEMORY_GB = 24
# torch 2.9.1's wheels are CUDA 12.8 builds: the host driver must support 12.8 or newer.
MIN_CUDA = (12, 8)
SECRET_REFERENCE = re.compile(r"^\{\{\s*RUNPOD_SECRET_[A-Za-z0-9_]+\s*\}\}$")
# Names that hold credentials: their values must be secret references, never literals.
SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|_KEY)(_|$)")
IMAGE_REFERENCE = re.compile(
    r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)+"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[a-f0-9]{64})$")
# The model needs no variable: the worker finds it (worker/model_source.py).
REQUIRED_ENV = ("CSM_WATERMARK_KEY",)
# Set from `type` and `http` for a load-balancing endpoint; never by hand.
HTTP_ENV = ("CSM_MODE", "PORT", "PORT_HEALTH")
# saveEndpoint with variables: its input takes `type` ("LB"), which the SDK's mutation leaves out.
SAVE_ENDPOINT = """
mutation saveEndpoint($input: EndpointInput!) {
    saveEndpoint(input: $input) { id name type templateId }
}"""


def graphql_safe(value: str, what: str) -> str:
    """runpod 1.10 pastes strings into GraphQL unescaped: a quote, backslash or newline breaks the query.

    The message names the field, not the value, which may be a credential.
    """
    if any(c in value for c in '"\\\n\r'):
        raise ValueError(f"{what} contains a quote, backslash or line break, which the RunPod SDK cannot send")
    return value


class Workers(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: int = Field(0, ge=0, le=100)
    max: int = Field(3, ge=1, le=100)

    @model_validator(mode="after")
    def ordered(self) -> Workers:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is larger than max ({self.max})")
        return self


class Scaler(BaseModel):
    """QUEUE_DELAY: seconds a job may wait before a worker is added; REQUEST_COUNT: jobs per worker."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["QUEUE_DELAY", "REQUEST_COUNT"] = "QUEUE_DELAY"
    value: int = Field(4, ge=1, le=1000)


class Http(BaseModel):
    """A load-balancing endpoint's ports: RunPod's PORT and PORT_HEALTH (which defaults to PORT)."""

    model_config = ConfigDict(extra="forbid")
    port: int = Field(8000, ge=1, le=65535)
    health_port: int | None = Field(None, ge=1, le=65535)

    @property
    def health(self) -> int:
        return self.health_port or self.port


class EndpointConfig(BaseModel):
    # Numbers in env are sent as strings anyway; unknown keys are typos.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,59}$")
    type: Literal["queue", "load_balancer"] = "queue"
    http: Http | None = None
    image: str
    registry_auth_id: str | None = None
    gpu_ids: list[str] = Field(min_length=1)
    gpu_count: int = Field(1, ge=1, le=1, description="the worker runs on one GPU")
    allowed_cuda_versions: list[str] = Field(min_length=1)
    workers: Workers = Workers()
    scaler: Scaler = Scaler()
    idle_timeout_s: int = Field(ge=1, le=3600)
    execution_timeout_s: int = Field(ge=10, le=86_400)
    container_disk_gb: int = Field(ge=10, le=200)
    flashboot: bool = True
    env: dict[str, str]

    @field_validator("image")
    @classmethod
    def pinned_image(cls, image: str) -> str:
        if not IMAGE_REFERENCE.match(image):
            raise ValueError(f"{image!r} is not a lowercase registry/repository:tag (or @sha256:) reference")
        if image.endswith(":latest"):
            raise ValueError("pin a version tag or digest instead of :latest, so workers run the image you tested")
        return image

    @field_validator("gpu_ids")
    @classmethod
    def known_pools(cls, ids: list[str]) -> list[str]:
        for gpu in ids:
            if gpu not in POOL_MEMORY_GB:
                raise ValueError(f"unknown GPU pool {gpu!r}; RunPod pools: {', '.join(POOL_MEMORY_GB)}")
            if POOL_MEMORY_GB[gpu] < MIN_GPU_MEMORY_GB:
                raise ValueError(f"{gpu} has {POOL_MEMORY_GB[gpu]} GB; this worker needs {MIN_GPU_MEMORY_GB} GB or more")
        if len(set(ids)) != len(ids):
            raise ValueError("a GPU pool is listed twice")
        return ids

    @field_validator("allowed_cuda_versions")
    @classmethod
    def recent_cuda(cls, versions: list[str]) -> list[str]:
        for version in versions:
            if not re.fullmatch(r"\d+\.\d+", version):
                raise ValueError(f"{version!r} is not a CUDA version like \"12.8\"")
            if tuple(map(int, version.split("."))) < MIN_CUDA:
                raise ValueError(f"CUDA {version} is too old: the image's torch needs 12.8 or newer")
        return versions

    @field_validator("registry_auth_id")
    @classmethod
    def sendable(cls, value: str | None) -> str | None:
        return value if value is None else graphql_safe(value, "registry_auth_id")

    @field_validator("env")
    @classmethod
    def safe_env(cls, env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
                raise ValueError(f"environment variable name {key!r} should be UPPER_SNAKE_CASE")
            graphql_safe(value, key)
            if SECRET_NAME.search(key) and not SECRET_REFERENCE.match(value):
                raise ValueError(
                    f"{key} must be a RunPod secret reference such as "
                    f"{{{{ RUNPOD_SECRET_{key.lower()} }}}}, never the value itself: "
                    "create the secret under Settings > Secrets in the RunPod console")
        missing = [key for key in REQUIRED_ENV if key not in env]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        concurrency = env.get("CSM_MAX_CONCURRENCY")
        if concurrency is not None and not (concurrency.isdigit() and 1 <= int(concurrency) <= 64):
            raise ValueError(f"CSM_MAX_CONCURRENCY must be a whole number from 1 to 64, not {concurrency!r}")
        set_by_type = [key for key in HTTP_ENV if key in env]
        if set_by_type:
            raise ValueError(f"{', '.join(set_by_type)}: set from `type` and `http`; remove it from env")
        return env

    @model_validator(mode="after")
    def endpoint_type(self) -> EndpointConfig:
        if self.type == "queue":
            if self.http is not None:
                raise ValueError("http: only for type load_balancer (a queue endpoint has no ports)")
            return self
        if self.scaler.type != "REQUEST_COUNT":
            raise ValueError("scaler.type: a load_balancer endpoint scales by REQUEST_COUNT "
                             "(requests per worker); QUEUE_DELAY needs a queue")
        if self.http is None:
            self.http = Http()
        return self


class DeployError(Exception):
    """A failure with a one-line message that tells the user what to do."""


def load_config(path: Path) -> EndpointConfig:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise DeployError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise DeployError(f"{path} is not valid YAML: {exc}") from exc
    try:
        return EndpointConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'file'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors())
        raise DeployError(f"{path} is invalid: {problems}") from exc


def template_request(config: EndpointConfig, now: datetime) -> dict:
    """Keyword arguments for runpod.create_template."""
    request = {
        "name": f"{config.name}-{now:%Y%m%dT%H%M%SZ}",
        "image_name": config.image,
        "container_disk_in_gb": config.container_disk_gb,
        "env": dict(config.env),
        "is_serverless": True,
        "registry_auth_id": config.registry_auth_id,
    }
    if config.type == "load_balancer":
        http = config.http
        request["env"].update(CSM_MODE="http", PORT=str(http.port), PORT_HEALTH=str(http.health))
        request["ports"] = ",".join(f"{port}/http" for port in sorted({http.port, http.health}))
    return request


def endpoint_request(config: EndpointConfig, template_id: str) -> dict:
    """Keyword arguments for runpod.create_endpoint."""
    return {
        "name": config.name,
        "template_id": template_id,
        "gpu_ids": ",".join(config.gpu_ids),
        "gpu_count": config.gpu_count,
        "allowed_cuda_versions": ",".join(config.allowed_cuda_versions),
        "idle_timeout": config.idle_timeout_s,
        "scaler_type": config.scaler.type,
        "scaler_value": config.scaler.value,
        "workers_min": config.workers.min,
        "workers_max": config.workers.max,
        "flashboot": config.flashboot,
    }


def load_balancer_input(wanted: dict, config: EndpointConfig) -> dict:
    """endpoint_request's fields as saveEndpoint's input, for a load-balancing endpoint."""
    fields = {
        "name": wanted["name"], "templateId": wanted["template_id"], "gpuIds": wanted["gpu_ids"],
        "gpuCount": wanted["gpu_count"], "allowedCudaVersions": wanted["allowed_cuda_versions"],
        "idleTimeout": wanted["idle_timeout"], "scalerType": wanted["scaler_type"],
        "scalerValue": wanted["scaler_value"], "workersMin": wanted["workers_min"],
        "workersMax": wanted["workers_max"], "executionTimeoutMs": config.execution_timeout_s * 1000,
        "type": "LB",
    }
    if wanted["flashboot"]:
        fields["flashBootType"] = "FLASHBOOT"
    return fields


def create_load_balancer(fields: dict, api_key: str) -> dict:
    """saveEndpoint with `type: LB`, the way the SDK sends its queries (same URL and header)."""
    url = os.environ.get("RUNPOD_API_BASE_URL", "https://api.runpod.io") + "/graphql"
    response = requests.post(url, json={"query": SAVE_ENDPOINT, "variables": {"input": fields}},
                             headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    if response.status_code == 401:
        raise AuthenticationError("Unauthorized request, please check your API key.")
    try:
        body = response.json()
    except ValueError:
        raise QueryError(f"HTTP {response.status_code} from the GraphQL API") from None
    if body.get("errors") or response.status_code >= 400:
        messages = "; ".join(e.get("message", "?") for e in body.get("errors", [])) or str(body)
        raise QueryError(messages)
    return body["data"]["saveEndpoint"]


def execution_timeout_note(config: EndpointConfig) -> str:
    # runpod 1.10's create_endpoint has no execution-timeout parameter.
    return (f"execution timeout: set {config.execution_timeout_s} s in the console (endpoint > Edit), "
            f"or send \"policy\": {{\"executionTimeout\": {config.execution_timeout_s * 1000}}} with each job")


def find_endpoint(endpoints: list[dict], name: str) -> dict | None:
    """RunPod may show FlashBoot endpoints as '<name> -fb'."""
    for endpoint in endpoints:
        if re.sub(r"\s*-fb$", "", endpoint.get("name", "")) == name:
            return endpoint
    return None


def drift(endpoint: dict, wanted: dict) -> list[str]:
    """Settings of an existing endpoint that differ from runpod.yaml (the SDK can only swap its template)."""
    fields = {"gpuIds": "gpu_ids", "workersMin": "workers_min", "workersMax": "workers_max",
              "idleTimeout": "idle_timeout", "scalerType": "scaler_type", "scalerValue": "scaler_value"}
    return [f"{api} is {endpoint[api]!r}, runpod.yaml wants {wanted[ours]!r}"
            for api, ours in fields.items() if api in endpoint and endpoint[api] != wanted[ours]]


def dry_run(config: EndpointConfig, now: datetime) -> None:
    endpoint = endpoint_request(config, "<id of the new template>")
    if config.type == "load_balancer":
        endpoint = load_balancer_input(endpoint, config)
    print(yaml.safe_dump({
        "template (create)": template_request(config, now),
        f"endpoint (create, or point the endpoint named {config.name!r} at the new template)":
            endpoint,
    }, sort_keys=False), end="")
    if config.type == "queue":
        print(execution_timeout_note(config))
    print("dry run: nothing was sent to RunPod")


def deploy(config: EndpointConfig, api_key: str, now: datetime) -> str:
    """Returns the endpoint id."""
    runpod.api_key = api_key
    try:
        existing = find_endpoint(runpod.get_endpoints(), config.name)
        template = runpod.create_template(**template_request(config, now))
        print(f"created template {template['name']} ({template['id']}) for {config.image}")
        wanted = endpoint_request(config, template["id"])
        if existing is None and config.type == "load_balancer":
            endpoint_id = create_load_balancer(load_balancer_input(wanted, config), api_key)["id"]
            print(f"created load-balancing endpoint {config.name} ({endpoint_id})")
        elif existing is None:
            endpoint_id = runpod.create_endpoint(**wanted)["id"]
            print(f"created endpoint {config.name} ({endpoint_id})")
        else:
            endpoint_id = existing["id"]
            runpod.update_endpoint_template(endpoint_id=endpoint_id, template_id=template["id"])
            print(f"endpoint {config.name} ({endpoint_id}) now runs template {template['id']}; "
                  "workers pick it up as they restart")
            for difference in drift(existing, wanted):
                print(f"note: {difference}: change it in the console (the SDK cannot update it)")
    except (AuthenticationError, QueryError) as exc:
        raise DeployError(f"RunPod refused the request: {exc}") from exc
    except OSError as exc:  # requests' connection errors
        raise DeployError(f"cannot reach the RunPod API ({exc}): check the network and run again") from exc
    if config.type == "load_balancer":
        print(f"requests: https://{endpoint_id}.api.runpod.ai/v1/audio/speech (and /ping, "
              "/v1/generate, /v1/audio/speech/stream)")
        return endpoint_id
    print(execution_timeout_note(config))
    print(f"requests: https://api.runpod.ai/v2/{endpoint_id}/run")
    return endpoint_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m builder.deploy", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("runpod.yaml"))
    parser.add_argument("--dry-run", action="store_true", help="print what would be created; call nothing")
    args = parser.parse_args(argv)
    now = datetime.now(timezone.utc)
    try:
        config = load_config(args.config)
        if args.dry_run:
            dry_run(config, now)
            return 0
        api_key = os.environ.get("RUNPOD_API_KEY", "").strip()
        if not api_key:
            raise DeployError("RUNPOD_API_KEY is not set: create an API key at "
                              "https://www.runpod.io/console/user/settings and export RUNPOD_API_KEY")
        deploy(config, api_key, now)
    except DeployError as exc:
        print(f"deploy: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
