"""Upload a generated model to a local S3 test server (moto) and read it with warmpool.

    python examples/s3_demo.py [MODEL_DIR]

Starts ``moto_server`` on a free loopback port, uploads the model with boto3, then runs
``warmpool metadata`` and ``warmpool prefetch`` against ``s3://demo/models/<name>/`` with
the endpoint in ``AWS_ENDPOINT_URL`` — exactly what you would do against MinIO, Ceph or
AWS — and stops the server. Needs the dev extra (moto, boto3).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    import boto3

    model = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "tiny"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "warmpool.cli", "generate", str(model)], check=True)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "RUNAI_STREAMER_S3_REQUEST_TIMEOUT_MS": "30000"}
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="demo", aws_secret_access_key="demo")
        s3.create_bucket(Bucket="demo")
        for path in sorted(p for p in model.rglob("*") if p.is_file()):
            s3.upload_file(str(path), "demo", f"models/{model.name}/{path.relative_to(model)}")
        uri = f"s3://demo/models/{model.name}/"
        for args in (["metadata", uri], ["prefetch", uri], ["attach", uri]):
            print(f"$ warmpool {' '.join(args)}", flush=True)
            subprocess.run([sys.executable, "-m", "warmpool.cli", *args], env=env, check=True)
    finally:
        server.terminate()
        server.wait(10)
        if len(sys.argv) <= 1:
            shutil.rmtree(model.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
