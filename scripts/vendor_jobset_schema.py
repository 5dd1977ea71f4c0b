"""Extract JobSet's openAPIV3Schema from its CRD into tests/fixtures/jobset-crd-schema.json.

    git clone https://github.com/kubernetes-sigs/jobset && cd jobset && git checkout v0.12.0
    python scripts/vendor_jobset_schema.py \
        jobset/config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml v0.12.0 COMMIT

The descriptions are dropped (the CRD is 0.8 MB with them, and validation never reads them);
every other keyword is kept as published.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "jobset-crd-schema.json"


def strip_descriptions(node, in_properties: bool = False):
    """Drop `description` keywords, but not a property that happens to be named so."""
    if isinstance(node, dict):
        return {k: strip_descriptions(v, k == "properties" and not in_properties)
                for k, v in node.items()
                if in_properties or not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main(crd_path: str, ref: str, commit: str) -> None:
    crd = yaml.safe_load(Path(crd_path).read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha2"]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({
        "$comment": (f"openAPIV3Schema of jobsets.jobset.x-k8s.io v1alpha2, from "
                     f"github.com/kubernetes-sigs/jobset {ref} (commit {commit}), "
                     "config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml, descriptions "
                     "removed: scripts/vendor_jobset_schema.py"),
        **strip_descriptions(version["schema"]["openAPIV3Schema"]),
    }, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
