"""The boto3 S3 client, and what its failures mean: one line naming the bucket/key and the
likely fix. Everything that talks to S3 goes through ``s3_client`` and ``translated``."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import threading
import weakref
from collections.abc import Iterator
from urllib.parse import unquote_plus, urlsplit

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
import botocore.session
import botocore.utils

from trainjob.errors import StorageError

# Query parameters that carry a secret, by name, any case: a signature (AWS X-Amz-Signature,
# GCS X-Goog-Signature, Azure SAS sig), a credential or a token (X-Amz-Credential,
# X-Amz-Security-Token, access_token...), keys and passwords.
_SECRET_PARAM = re.compile(r"(?:^|[-_])(?:sig|signature|credential|token|key|apikey|password|"
                           r"secret)$|accesskeyid$", re.IGNORECASE)
REDACTED = "REDACTED"


def redact(uri: str) -> str:
    """``uri`` fit to log, show or store: without user:password, and with the value of every
    query parameter that carries a secret (``_SECRET_PARAM``) replaced by REDACTED; the
    rest is kept as written."""
    parts = urlsplit(uri)
    if parts.password or parts.username:
        parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
    if parts.query:
        fields = [f"{name}={REDACTED}" if _SECRET_PARAM.search(unquote_plus(name)) else field
                  for field in parts.query.split("&")
                  for name in [field.partition("=")[0]]]
        parts = parts._replace(query="&".join(fields))
    return parts.geturl()


_client_lock = threading.Lock()
_clients: dict[tuple[int, int | None], object] = {}
_credentials: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # client -> its credentials


def s3_client(threads: int = 16, attempts: int | None = None):  # -> botocore S3 client
    """One client per pool size (and retry budget), from boto3's standard chain, tuned for
    S3-compatible stores. ``attempts`` overrides AWS_MAX_ATTEMPTS (the default: 8)."""
    with _client_lock:
        if (threads, attempts) in _clients:
            return _clients[threads, attempts]
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        config = botocore.config.Config(
            retries={"mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                     "max_attempts": attempts or int(os.environ.get("AWS_MAX_ATTEMPTS", "8"))},
            max_pool_connections=max(10, threads + 4),
            connect_timeout=10,
            read_timeout=60,
            # MinIO, Ceph and friends reject or mangle the newer default checksums.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path" if endpoint else "auto"},
        )
        core = botocore.session.get_session()
        core.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=parse_timestamp)
        session = boto3.session.Session(botocore_session=core)
        region = session.region_name or ("us-east-1" if endpoint else None)
        client = session.client("s3", endpoint_url=endpoint, region_name=region, config=config)
        _clients[threads, attempts] = client
        _credentials[client] = session.get_credentials()
        return client


def parse_timestamp(value: object) -> datetime.datetime:
    """botocore's timestamps, faster: it runs dateutil on each (~80 us, half the CPU of a
    listing); S3 sends ISO 8601, which the standard library reads in ~1 us."""
    try:
        parsed = datetime.datetime.fromisoformat(value)  # type: ignore[arg-type]
        if parsed.tzinfo is not None:
            return parsed
    except (TypeError, ValueError):
        pass
    return botocore.utils.parse_timestamp(value)  # HTTP dates, epoch numbers, no zone


def signing_credentials(client):  # -> botocore Credentials | None
    """The credentials ``client`` signs with: the very object, so refreshable ones (IRSA,
    assumed roles) stay shared. None for a client not made by ``s3_client``."""
    return _credentials.get(client)


def describe_error(exc: Exception, where: str) -> str:
    """Turn a botocore failure into one line: what happened, where, what to do."""
    endpoint = endpoint_name()
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return (f"no S3 credentials found for {where}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, a profile, or a pod identity (IRSA)")
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError,
                        botocore.exceptions.ConnectTimeoutError,
                        botocore.exceptions.ConnectionClosedError,
                        botocore.exceptions.ReadTimeoutError)):
        return (f"cannot reach the S3 endpoint {endpoint} for {where}: check AWS_ENDPOINT_URL "
                "and that the server is up")
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket",):
            return f"bucket for {where} does not exist: create it or fix the URI"
        if code in ("NoSuchKey", "404", "NotFound"):
            return f"{where} does not exist: check the key"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                    "ExpiredToken", "AuthorizationHeaderMalformed"):
            return (f"invalid S3 credentials for {where} ({code}): check AWS_ACCESS_KEY_ID "
                    "and AWS_SECRET_ACCESS_KEY")
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            return f"access denied to {where}: grant the job's identity s3 access to it"
        return f"S3 error {code or status} on {where}: {err.get('Message') or exc}"
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return f"S3 failure on {where}: {exc}"
    return f"storage failure on {where}: {exc}"


def endpoint_name() -> str:
    return redact(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                  or "AWS S3")


@contextlib.contextmanager
def translated(where: str) -> Iterator[None]:
    """Re-raise botocore and OS failures as StorageError naming ``where``."""
    try:
        yield
    except StorageError:
        raise
    except boto3.exceptions.Boto3Error as exc:
        # upload_file wraps a ClientError in S3UploadFailedError, download_file wraps retry
        # exhaustion in RetriesExceededError: describe what lies underneath.
        inner = getattr(exc, "last_exception", None) or exc.__cause__ or exc.__context__
        raise StorageError(describe_error(inner if isinstance(inner, Exception) else exc,
                                          where)) from exc
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
            ConnectionError, TimeoutError) as exc:
        raise StorageError(describe_error(exc, where)) from exc
