"""deploy/rbac.yaml grants exactly the rules deploy/rbac-needs.json lists, each with a reason,
and binds them to the group the access entries map the function's role to.

rbac-needs.json is the list a Rust test checks against the requests the Kubernetes emulator
sees during the end-to-end tests; this check ties the manifest to that list.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import KUBERNETES_GROUP, RBAC, RBAC_NEEDS, Failures, cfn_resources, load_cfn, tf_module  # noqa: E402


def main() -> None:
    import yaml

    failures = Failures("rbac")
    docs = [d for d in yaml.safe_load_all(RBAC.read_text(encoding="utf-8")) if d]
    roles = [d for d in docs if d.get("kind") == "ClusterRole"]
    bindings = [d for d in docs if d.get("kind") == "ClusterRoleBinding"]
    others = [d.get("kind") for d in docs if d not in roles and d not in bindings]
    if len(roles) != 1 or len(bindings) != 1 or others:
        failures.add(f"{RBAC.name}: expected one ClusterRole and one ClusterRoleBinding, found {[d.get('kind') for d in docs]}")
        failures.finish("")
    role, binding = roles[0], bindings[0]

    granted: set[tuple[str, str, str]] = set()
    for i, rule in enumerate(role.get("rules", [])):
        for key in ("resourceNames", "nonResourceURLs"):
            if key in rule:
                failures.add(f"rule {i}: {key} is not expected")
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule.get("verbs", []):
                    if "*" in (group, resource, verb):
                        failures.add(f"rule {i}: wildcard in {group!r}/{resource!r}/{verb!r}")
                    granted.add((group, resource, verb))

    needs = json.loads(RBAC_NEEDS.read_text(encoding="utf-8"))
    needed: set[tuple[str, str, str]] = set()
    for i, need in enumerate(needs):
        missing = {"apiGroup", "resource", "verb", "why"} - set(need)
        if missing:
            failures.add(f"{RBAC_NEEDS.name}[{i}]: missing {sorted(missing)}")
            continue
        if len(need["why"].strip()) < 10:
            failures.add(f"{RBAC_NEEDS.name}[{i}]: {need['resource']} {need['verb']} needs a reason")
        key = (need["apiGroup"], need["resource"], need["verb"])
        if key in needed:
            failures.add(f"{RBAC_NEEDS.name}: {key} listed twice")
        needed.add(key)

    fmt = lambda k: f"{k[0] or 'core'}/{k[1]} {k[2]}"  # noqa: E731
    for key in sorted(granted - needed):
        failures.add(f"{RBAC.name} grants {fmt(key)}, which {RBAC_NEEDS.name} does not list")
    for key in sorted(needed - granted):
        failures.add(f"{RBAC_NEEDS.name} lists {fmt(key)}, which {RBAC.name} does not grant")

    name = role["metadata"]["name"]
    ref = binding.get("roleRef", {})
    if ref.get("kind") != "ClusterRole" or ref.get("name") != name:
        failures.add(f"the binding refers to {ref}, not ClusterRole {name}")
    subjects = binding.get("subjects", [])
    if subjects != [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": KUBERNETES_GROUP}]:
        failures.add(f"the binding's subjects must be exactly the Group {KUBERNETES_GROUP}, found {subjects}")

    # Every access entry (ClusterName's, and one per cluster in Clusters) maps the role to
    # that group.
    template = load_cfn()
    entries = {k: r for k, r in cfn_resources(template).items() if r["Type"] == "AWS::EKS::AccessEntry"}
    if not entries:
        failures.add("template.yaml: no access entry")
    for key, entry in entries.items():
        if entry["Properties"].get("KubernetesGroups") != [KUBERNETES_GROUP]:
            failures.add(f"template.yaml: access entry {key} must map the role to [{KUBERNETES_GROUP}]")
    module = tf_module()
    tf_entries = {k: v for k, v in module["resource"].items() if k.startswith("aws_eks_access_entry.")}
    group_local = module["locals"].get("kubernetes_group")
    if not tf_entries:
        failures.add("terraform/: no access entry")
    for key, entry in tf_entries.items():
        groups = entry.get("kubernetes_groups")
        if groups not in ([KUBERNETES_GROUP], ["${local.kubernetes_group}"]) or (
            groups == ["${local.kubernetes_group}"] and group_local != KUBERNETES_GROUP
        ):
            failures.add(f"terraform/: {key} must map the role to [{KUBERNETES_GROUP}]")

    failures.finish(f"{len(granted)} rules, each listed with its reason, bound to the group {KUBERNETES_GROUP}")


if __name__ == "__main__":
    main()
