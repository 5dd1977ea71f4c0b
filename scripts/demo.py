"""`make demo`: the real job end to end against an embedded local S3 server.

Starts SeaweedFS (a real object store: ``weed mini``, on loopback only), generates a
~10 class x 20 image sample laid out like the official caltech-101.zip, uploads it, runs
`trainjob train` for 3 epochs at 64 px, lists the run folder in the bucket and downloads
history.png. Cleans up its server on the way out.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sampledata  # noqa: E402
from s3server import start_seaweed, stop_server  # noqa: E402

OUT = HERE.parent / ".demo"


PICTURES = ("history.png", "confusion.png", "per_class.png")  # downloaded into .demo/


def main() -> int:
    OUT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="trainjob-demo-"))
    server = start_seaweed(work, buckets=("datasets", "runs"))
    try:
        print(f"local S3 server (SeaweedFS): {server.endpoint}")
        names = sampledata.make_class_folders(work / "101_ObjectCategories", classes=10,
                                              per_class=20)
        sampledata.add_bad_files(work / "101_ObjectCategories", names)
        archive = sampledata.make_official_zip(work / "caltech-101.zip",
                                               work / "101_ObjectCategories")
        client = server.client()
        client.upload_file(str(archive), "datasets", "caltech-101.zip")
        print("uploaded s3://datasets/caltech-101.zip (10 classes x 20 images + odd files)")
        cmd = [sys.executable, "-m", "trainjob.cli", "train",
               "--data", "s3://datasets/caltech-101.zip", "--output", "s3://runs/demo",
               "--epochs", "3", "--image-size", "64", "--batch-size", "16",
               "--max-bad-fraction", "0.1", "--overwrite"]
        print("$ AWS_ENDPOINT_URL=%s trainjob train %s" % (server.endpoint, " ".join(cmd[4:])))
        start = time.monotonic()
        env = server.env(TRAINJOB_HOME=str(work / "home"))
        rc = subprocess.call(cmd, env=env)
        print(f"trainjob exited {rc} after {time.monotonic() - start:.0f}s")
        if rc != 0:
            return rc
        print("\nrun folder s3://runs/demo:")
        for key, size in sorted(server.keys("runs", "demo/").items()):
            print(f"  {size:>12,d}  {key}")
        for picture in PICTURES:
            client.download_file("runs", f"demo/{picture}", str(OUT / picture))
        # The last screen: the run as `trainjob runs show` tells it (a table, not raw JSON).
        show = [sys.executable, "-m", "trainjob.cli", "runs", "show", "s3://runs/demo"]
        print("\n$ trainjob runs show s3://runs/demo")
        sys.stdout.flush()
        rc = subprocess.call(show, env=env)
        print(f"\npictures: {', '.join(str(OUT / p) for p in PICTURES)}")
        return rc
    finally:
        stop_server(server)
        subprocess.call(["rm", "-rf", str(work)])


if __name__ == "__main__":
    sys.exit(main())
