#!/usr/bin/env python3
"""Validates rendered manifests (a kustomize output file): every object whose schema Kubernetes
ships is checked by kubernetes-validate --strict; the objects of CRDs it has no schema for (the
snapshot API of the Kubernetes CSI project) are listed by name, and checked here for the fields
ferrovol relies on, instead of passing silently.

    deploy/validate.py RENDERED.yaml
"""
import subprocess, sys, tempfile
import yaml

# Kinds of CRDs (not in Kubernetes' own schemas), and what each must say.
CRD_KINDS = {
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): lambda o: (
        o.get("driver") == "csi.ferrovol.io" and o.get("deletionPolicy") in ("Delete", "Retain")),
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshot"): lambda o: (
        bool(o.get("spec", {}).get("volumeSnapshotClassName"))
        and bool(o.get("spec", {}).get("source", {}).get("persistentVolumeClaimName"))),
}

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
builtin, crd = [], []
for d in docs:
    key = (d.get("apiVersion"), d.get("kind"))
    if key in CRD_KINDS:
        crd.append(d)
    elif key[0].startswith("snapshot.storage.k8s.io/"):
        sys.exit(f"{key[1]} {d['metadata']['name']}: a snapshot API object this check does not know")
    else:
        builtin.append(d)
for d in crd:
    name = d["metadata"]["name"]
    if not CRD_KINDS[(d["apiVersion"], d["kind"])](d):
        sys.exit(f"{d['kind']} {name}: missing or wrong fields")
    print(f"  {d['kind']} {name}: a CRD kind without a schema in kubernetes-validate; its fields checked here")
if builtin:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump_all(builtin, f)
        f.flush()
        subprocess.run(["kubernetes-validate", "--strict", "--kubernetes-version", "1.30.0", "--quiet", f.name], check=True)
print(f"{len(builtin)} objects schema-validated, {len(crd)} CRD objects field-checked")
