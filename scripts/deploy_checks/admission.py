"""deploy/admission-policy.yaml (optional, applied by operators who want it) holds the same
identities deploy/rbac.yaml and cluster-agent/deploy/rbac.yaml grant to: the function's group
and the agent's ServiceAccount, in every policy's matchConditions; its prefix is core's
DEFAULT_PREFIX; each policy has a binding that denies; it uses the GA API (v1).

What the policies' CEL allows and refuses is tested on a real API server by
tests/tests/admission.rs.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CORE_SRC, KUBERNETES_GROUP, ROOT, Failures  # noqa: E402

POLICY = ROOT / "deploy" / "admission-policy.yaml"
AGENT_RBAC = ROOT / "cluster-agent" / "deploy" / "rbac.yaml"
API_VERSION = "admissionregistration.k8s.io/v1"


def main() -> None:
    import yaml

    failures = Failures("admission")
    docs = [d for d in yaml.safe_load_all(POLICY.read_text(encoding="utf-8")) if d]
    policies = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ValidatingAdmissionPolicy"}
    bindings = [d for d in docs if d.get("kind") == "ValidatingAdmissionPolicyBinding"]
    others = [d.get("kind") for d in docs if d not in bindings and d.get("kind") != "ValidatingAdmissionPolicy"]
    if not policies or others:
        failures.add(f"{POLICY.name}: expected ValidatingAdmissionPolicies and their bindings, found {others or 'no policy'}")
    for d in docs:
        if d.get("apiVersion") != API_VERSION:
            failures.add(f"{d.get('kind')} {d['metadata']['name']}: apiVersion {d.get('apiVersion')!r}, not {API_VERSION}")

    agent_docs = [d for d in yaml.safe_load_all(AGENT_RBAC.read_text(encoding="utf-8")) if d]
    accounts = [d for d in agent_docs if d.get("kind") == "ServiceAccount"]
    if len(accounts) != 1:
        failures.add(f"{AGENT_RBAC.name}: expected one ServiceAccount, found {len(accounts)}")
        failures.finish("")
    account = accounts[0]["metadata"]
    agent_user = f"system:serviceaccount:{account['namespace']}:{account['name']}"

    prefix = re.search(r'pub const DEFAULT_PREFIX: &str = "([^"]+)";', (CORE_SRC / "policy.rs").read_text(encoding="utf-8"))
    if not prefix:
        failures.add("core/src/policy.rs: no DEFAULT_PREFIX")
        failures.finish("")

    for name, policy in policies.items():
        spec = policy.get("spec", {})
        if spec.get("failurePolicy") != "Fail":
            failures.add(f"{name}: failurePolicy is not Fail")
        conditions = " ".join(c.get("expression", "") for c in spec.get("matchConditions", []))
        for wanted in (f"'{KUBERNETES_GROUP}' in request.userInfo.groups", f"request.userInfo.username == '{agent_user}'"):
            if wanted not in conditions:
                failures.add(f"{name}: matchConditions do not name {wanted!r}")
        variables = {v["name"]: v["expression"] for v in spec.get("variables", [])}
        if "prefix" in variables and variables["prefix"] != f"'{prefix.group(1)}/'":
            failures.add(f"{name}: prefix {variables['prefix']} is not core's DEFAULT_PREFIX {prefix.group(1)!r} with a slash")
        if not spec.get("validations"):
            failures.add(f"{name}: no validations")
        bound = [b for b in bindings if b.get("spec", {}).get("policyName") == name]
        if len(bound) != 1 or bound[0]["spec"].get("validationActions") != ["Deny"]:
            failures.add(f"{name}: expected one binding with validationActions [Deny], found {[b['spec'] for b in bound]}")
    if "prefix" not in {v["name"] for p in policies.values() for v in p.get("spec", {}).get("variables", [])}:
        failures.add("no policy has the `prefix` variable the README tells operators to change")
    for b in bindings:
        if b.get("spec", {}).get("policyName") not in policies:
            failures.add(f"binding {b['metadata']['name']} names no policy of the file")
    failures.finish(f"{len(policies)} policies for {KUBERNETES_GROUP} and {agent_user}, prefix {prefix.group(1)}/")


if __name__ == "__main__":
    main()
