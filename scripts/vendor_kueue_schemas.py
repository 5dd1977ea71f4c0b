"""Extract Kueue's openAPIV3Schemas from its CRDs into tests/fixtures/kueue-<kind>-crd-schema.json.

    git clone https://github.com/kubernetes-sigs/kueue && cd kueue && git checkout v0.19.2
    python scripts/vendor_kueue_schemas.py kueue/config/components/crd/bases v0.19.2 COMMIT

One file per kind the example queues use (ResourceFlavor, ClusterQueue, LocalQueue), of the
v1beta2 version (the storage version since v0.15; v1beta1 is deprecated). Descriptions are
dropped as for JobSet's (scripts/vendor_jobset_schema.py); every other keyword is kept.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from vendor_jobset_schema import strip_descriptions

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
VERSION = "v1beta2"
CRDS = {"resourceflavor": "kueue.x-k8s.io_resourceflavors.yaml",
        "clusterqueue": "kueue.x-k8s.io_clusterqueues.yaml",
        "localqueue": "kueue.x-k8s.io_localqueues.yaml"}


def main(crd_dir: str, ref: str, commit: str) -> None:
    for kind, name in CRDS.items():
        crd = yaml.safe_load((Path(crd_dir) / name).read_text())
        [version] = [v for v in crd["spec"]["versions"] if v["name"] == VERSION]
        assert version["served"] and version["storage"], f"{name}: {VERSION} not the storage"
        out = OUT / f"kueue-{kind}-crd-schema.json"
        out.write_text(json.dumps({
            "$comment": (f"openAPIV3Schema of {crd['metadata']['name']} {VERSION}, from "
                         f"github.com/kubernetes-sigs/kueue {ref} (commit {commit}), "
                         f"config/components/crd/bases/{name}, descriptions removed: "
                         "scripts/vendor_kueue_schemas.py"),
            **strip_descriptions(version["schema"]["openAPIV3Schema"]),
        }, indent=1, sort_keys=True) + "\n")
        print(f"{out.relative_to(OUT.parents[1])}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
