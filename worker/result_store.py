"""Results stored in an S3-compatible bucket, handed back as presigned URLs.

A queue job's result can't be larger than RunPod's API returns (about 20 MB): with a bucket
(CSM_BUCKET_NAME and RunPod's BUCKET_* variables), a whole job's audio that would not fit goes
there instead, and the job returns a URL that fetches it for CSM_RESULT_URL_TTL_S. Meant for
any S3-compatible store (AWS S3, Cloudflare R2, Backblaze B2, MinIO ...); tested against
moto's S3 server only.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from .settings import BucketSettings, StartupError

# Connecting should take well under a second; a store that doesn't answer within this is down.
CONNECT_TIMEOUT_S = 5
# One socket read; an upload of tens of MB is many reads.
READ_TIMEOUT_S = 60
# What ResultStore.connect writes under the prefix at each start.
CHECK_OBJECT = ".csm-worker-check"
CHECK_BODY = b"Written by the CSM worker at each start, to check that it may store results here.\n"


class ResultStoreError(Exception):
    """The audio was made but could not be stored; the message says so and goes back."""


@dataclass(frozen=True)
class StoredResult:
    url: str
    expires_at: str  # ISO 8601, UTC
    key: str


class ResultStore:
    def __init__(self, client: Any, settings: BucketSettings):
        self.client = client
        self.settings = settings

    @classmethod
    def connect(cls, settings: BucketSettings) -> "ResultStore":
        """The store, once a write to the bucket has worked: a wrong name, endpoint or key
        stops the worker at start-up (StartupError), not after a job's GPU time is spent.

        The check writes CHECK_OBJECT under the prefix: a write is what results need, and a
        key allowed only to write and read objects (no listing) passes it, which HeadBucket
        would refuse.
        """
        # Imported here: boto3 costs every start ~0.15 s, and only a worker with a bucket
        # needs it.
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client = boto3.client(
                "s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
                aws_access_key_id=settings.access_key_id,
                aws_secret_access_key=settings.secret_access_key,
                config=Config(signature_version="s3v4", connect_timeout=CONNECT_TIMEOUT_S,
                              read_timeout=READ_TIMEOUT_S,
                              retries={"max_attempts": 3, "mode": "standard"}))
        except ValueError as e:  # boto3's word on a malformed endpoint or region
            raise StartupError(f"BUCKET_ENDPOINT_URL or CSM_BUCKET_REGION can't be used: {e}") \
                from None
        try:
            client.put_object(Bucket=settings.name, Key=settings.prefix + CHECK_OBJECT,
                              Body=CHECK_BODY, ContentType="text/plain")
        except (BotoCoreError, ClientError) as e:
            where = settings.endpoint_url or "AWS S3"
            raise StartupError(
                f"CSM_BUCKET_NAME: bucket {settings.name!r} at {where} can't be used "
                f"({_reason(e)}); check the name, BUCKET_ENDPOINT_URL, CSM_BUCKET_REGION and "
                "the keys") from None
        return cls(client, settings)

    def put(self, data: bytes, extension: str, media_type: str) -> StoredResult:
        """Store `data` under a new key (the prefix, today's date, a random name) and return a
        URL that fetches it until it expires. Blocking: call it from a thread."""
        from botocore.exceptions import BotoCoreError, ClientError

        now = dt.datetime.now(dt.timezone.utc)
        key = f"{self.settings.prefix}{now:%Y-%m-%d}/{uuid.uuid4().hex}.{extension}"
        try:
            self.client.put_object(Bucket=self.settings.name, Key=key, Body=data,
                                   ContentType=media_type)
            url = self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.settings.name, "Key": key},
                ExpiresIn=self.settings.url_ttl_s)
        except (BotoCoreError, ClientError) as e:
            raise ResultStoreError(
                f"the audio was made but could not be stored in bucket {self.settings.name!r} "
                f"({_reason(e)}); retry the job") from None
        expires = now + dt.timedelta(seconds=self.settings.url_ttl_s)
        return StoredResult(url=url, expires_at=expires.isoformat(timespec="seconds")
                            .replace("+00:00", "Z"), key=key)


def _reason(error: Exception) -> str:
    """botocore's message without its request details; it never holds a key."""
    response = getattr(error, "response", None)
    if response:
        code = response.get("Error", {}).get("Code", "")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return {"404": "no such bucket", "NoSuchBucket": "no such bucket",
                "403": "access denied", "AccessDenied": "access denied"}.get(
            str(code), f"{code or 'error'}, HTTP {status}")
    return " ".join(str(error).split())  # one line: botocore's may hold several
