"""deploy/rbac.yaml grants exactly the rules deploy/rbac-needs.json lists, each with a reason,
and binds them to the group the access entries map the function's role to. A need with a
"namespace" is granted by a Role in that namespace only (Events, in default), the others by
the ClusterRole.

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
    kinds = [d.get("kind") for d in docs]
    roles = [d for d in docs if d.get("kind") == "ClusterRole"]
    bindings = [d for d in docs if d.get("kind") == "ClusterRoleBinding"]
    ns_roles = [d for d in docs if d.get("kind") == "Role"]
    ns_bindings = [d for d in docs if d.get("kind") == "RoleBinding"]
    others = [k for k in kinds if k not in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")]
    if len(roles) != 1 or len(bindings) != 1 or others:
        failures.add(f"{RBAC.name}: expected one ClusterRole and one ClusterRoleBinding (and Roles with their RoleBindings), found {kinds}")
        failures.finish("")
    role, binding = roles[0], bindings[0]

    # (namespace or "" for cluster-wide, apiGroup, resource, verb)
    granted: set[tuple[str, str, str, str]] = set()

    def grants(role_doc: dict, namespace: str) -> None:
        for i, rule in enumerate(role_doc.get("rules", [])):
            for key in ("resourceNames", "nonResourceURLs"):
                if key in rule:
                    failures.add(f"{role_doc['kind']} {role_doc['metadata']['name']} rule {i}: {key} is not expected")
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    for verb in rule.get("verbs", []):
                        if "*" in (group, resource, verb):
                            failures.add(f"rule {i}: wildcard in {group!r}/{resource!r}/{verb!r}")
                        granted.add((namespace, group, resource, verb))

    grants(role, "")
    subjects_wanted = [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": KUBERNETES_GROUP}]
    for r in ns_roles:
        namespace = r["metadata"].get("namespace", "")
        if not namespace:
            failures.add(f"Role {r['metadata']['name']} has no namespace")
            continue
        bound = [
            b
            for b in ns_bindings
            if b["metadata"].get("namespace") == namespace
            and b.get("roleRef", {}).get("kind") == "Role"
            and b["roleRef"].get("name") == r["metadata"]["name"]
        ]
        if len(bound) != 1:
            failures.add(f"Role {namespace}/{r['metadata']['name']} needs exactly one RoleBinding, found {len(bound)}")
        elif bound[0].get("subjects") != subjects_wanted:
            failures.add(f"RoleBinding {namespace}/{bound[0]['metadata']['name']} must bind exactly the Group {KUBERNETES_GROUP}")
        grants(r, namespace)
    for b in ns_bindings:
        if b.get("roleRef", {}).get("kind") != "Role" or not any(
            r["metadata"]["name"] == b["roleRef"].get("name") and r["metadata"].get("namespace") == b["metadata"].get("namespace")
            for r in ns_roles
        ):
            failures.add(f"RoleBinding {b['metadata'].get('namespace')}/{b['metadata']['name']} binds no Role of this manifest")

    needs = json.loads(RBAC_NEEDS.read_text(encoding="utf-8"))
    needed: set[tuple[str, str, str, str]] = set()
    for i, need in enumerate(needs):
        missing = {"apiGroup", "resource", "verb", "why"} - set(need)
        if missing:
            failures.add(f"{RBAC_NEEDS.name}[{i}]: missing {sorted(missing)}")
            continue
        if len(need["why"].strip()) < 10:
            failures.add(f"{RBAC_NEEDS.name}[{i}]: {need['resource']} {need['verb']} needs a reason")
        # "namespace": granted by a Role in that namespace only; none: by the ClusterRole.
        key = (need.get("namespace", ""), need["apiGroup"], need["resource"], need["verb"])
        if key in needed:
            failures.add(f"{RBAC_NEEDS.name}: {key} listed twice")
        needed.add(key)

    fmt = lambda k: f"{k[1] or 'core'}/{k[2]} {k[3]} {'in ' + k[0] if k[0] else 'cluster-wide'}"  # noqa: E731
    for key in sorted(granted - needed):
        failures.add(f"{RBAC.name} grants {fmt(key)}, which {RBAC_NEEDS.name} does not list")
    for key in sorted(needed - granted):
        failures.add(f"{RBAC_NEEDS.name} lists {fmt(key)}, which {RBAC.name} does not grant")

    name = role["metadata"]["name"]
    ref = binding.get("roleRef", {})
    if ref.get("kind") != "ClusterRole" or ref.get("name") != name:
        failures.add(f"the binding refers to {ref}, not ClusterRole {name}")
    subjects = binding.get("subjects", [])
    if subjects != subjects_wanted:
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

    failures.finish(
        f"{len(granted)} rules ({sum(1 for k in granted if k[0])} namespaced), each listed with its reason, "
        f"bound to the group {KUBERNETES_GROUP}"
    )


if __name__ == "__main__":
    main()
