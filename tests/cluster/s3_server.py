"""A real S3-compatible server for tests: moto's standalone server on 127.0.0.1, a free port.

`s3_server()` starts it, points pyarrow (and boto3) at it through AWS_ENDPOINT_URL with dummy
credentials, creates a bucket, yields its name, and stops the server and restores the
environment afterwards. Nothing leaves the loopback interface.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

BUCKET = "cr-test"
ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
       "AWS_REGION", "AWS_EC2_METADATA_DISABLED")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server(bucket: str = BUCKET) -> Iterator[str]:
    import pytest

    pytest.importorskip("moto", reason="moto[server] is in the dev extra")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in ENV}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.2)
        os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                          AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1",
                          AWS_EC2_METADATA_DISABLED="true")
        import boto3

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
        yield bucket
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def list_keys(bucket: str, prefix: str = "") -> list[str]:
    """Every object key under `prefix` in `bucket` (boto3: independent of the code under test)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        # keys ending in "/" are the empty "directory" markers pyarrow leaves: not data
        keys += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    return sorted(keys)
