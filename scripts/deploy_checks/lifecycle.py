"""The role's lifecycle permissions (CompleteLifecycleAction, RecordLifecycleActionHeartbeat)
hold only in Auto Scaling groups that carry the managed tag, in both templates, whenever the
function itself serves only instances that carry it (CheckManagedTag / check_managed_tag) and
the switch LifecycleManagedGroupsOnly / lifecycle_managed_groups_only is on (the default):

- template.yaml: one AWS::IAM::RolePolicy on the role, written by an Fn::ForEach over
  `!Ref ManagedTag`, whose statement's Condition is `!If [<cond>, {... StringLike:
  {autoscaling:ResourceTag/${<id>}: "*"}}, {... without it}]`, <cond> being exactly
  CheckManagedTag = "true" and LifecycleManagedGroupsOnly = "true";
- terraform/: the statement LifecycleActions with a dynamic condition StringLike
  `autoscaling:ResourceTag/<managed_tag>` = "*", for_each'd on check_managed_tag &&
  lifecycle_managed_groups_only;
- no other statement of either grants a lifecycle action (it would grant it without the
  condition), and both switches default to on.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Failures, as_list, cfn_branches, cfn_resources, load_cfn, tf_module  # noqa: E402

LIFECYCLE = {"autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat"}
SWITCH_SAM = "LifecycleManagedGroupsOnly"
SWITCH_TF = "lifecycle_managed_groups_only"


def statements(document: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for statement in cfn_branches(document.get("Statement", [])):
        for s in as_list(statement):
            out.extend(cfn_branches(s))
    return out


def check_template(failures: Failures) -> None:
    template = load_cfn()
    params = template.get("Parameters", {})
    conditions = template.get("Conditions", {})
    if params.get(SWITCH_SAM, {}).get("Default") != "true":
        failures.add(f"template.yaml: parameter {SWITCH_SAM} must exist and default to \"true\"")

    # Every statement that grants a lifecycle action, wherever it is.
    granting: list[tuple[str, dict[str, Any]]] = []
    for rid, r in cfn_resources(template).items():
        props = r.get("Properties", {})
        docs = []
        if r["Type"] == "AWS::IAM::Role":
            docs = [p["PolicyDocument"] for p in props.get("Policies", [])]
        elif r["Type"] in ("AWS::IAM::RolePolicy", "AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            docs = [props["PolicyDocument"]]
        for doc in docs:
            for s in statements(doc):
                if LIFECYCLE & set(as_list(s.get("Action", []))):
                    granting.append((rid, s))
    if len(granting) != 1:
        failures.add(f"template.yaml: expected one statement granting the lifecycle actions, found {[g[0] for g in granting]}")
        return

    # It sits in the loop over ManagedTag.
    loops = [
        (key, value)
        for key, value in template.get("Resources", {}).items()
        if key.startswith("Fn::ForEach::") and any(k == granting[0][0] for k in value[2])
    ]
    if not loops:
        failures.add("template.yaml: the lifecycle policy is not written by an Fn::ForEach over !Ref ManagedTag")
        return
    identifier, collection, _body = loops[0][1]
    if collection != {"Ref": "ManagedTag"}:
        failures.add(f"template.yaml: {loops[0][0]} loops over {collection}, not !Ref ManagedTag")
    if template["Parameters"].get("ManagedTag", {}).get("Type") != "CommaDelimitedList":
        failures.add("template.yaml: ManagedTag must be a CommaDelimitedList (Fn::ForEach's collection)")

    statement = granting[0][1]
    condition = statement.get("Condition")
    if not (isinstance(condition, dict) and set(condition) == {"Fn::If"}):
        failures.add(f"template.yaml: the lifecycle statement's Condition must be !If [<switch>, with tag, without]; found {condition}")
        return
    name, on, off = condition["Fn::If"]
    key = f"autoscaling:ResourceTag/${{{identifier}}}"
    if on.get("StringLike") != {key: "*"}:
        failures.add(f"template.yaml: with {name}, the condition must be StringLike {{{key}: '*'}}; found {on.get('StringLike')}")
    if "StringLike" in off or any("ResourceTag" in str(k) for k in off.get("StringEquals", {})):
        failures.add(f"template.yaml: without {name}, the lifecycle statement must carry no tag condition; found {off}")
    if {k: v for k, v in on.items() if k != "StringLike"} != off:
        failures.add(f"template.yaml: the two branches of the lifecycle condition differ in more than the tag: {on} / {off}")
    want = {
        "Fn::And": [
            {"Fn::Equals": [{"Ref": "CheckManagedTag"}, "true"]},
            {"Fn::Equals": [{"Ref": SWITCH_SAM}, "true"]},
        ]
    }
    if conditions.get(name) != want:
        failures.add(f"template.yaml: condition {name} must be CheckManagedTag = true and {SWITCH_SAM} = true; found {conditions.get(name)}")


def check_terraform(failures: Failures) -> None:
    module = tf_module()
    var = module["variable"].get(SWITCH_TF)
    if var is None or var.get("default") is not True:
        failures.add(f"terraform/: variable {SWITCH_TF} must exist and default to true")
    local = module["locals"].get(SWITCH_TF)
    if local != f"${{var.check_managed_tag && var.{SWITCH_TF}}}":
        failures.add(f"terraform/: local.{SWITCH_TF} must be var.check_managed_tag && var.{SWITCH_TF}; found {local}")

    granting = []
    for name, doc in module["data"].items():
        if not name.startswith("aws_iam_policy_document."):
            continue
        plain = list(as_list(doc.get("statement", [])))
        dynamic = [
            c
            for d in as_list(doc.get("dynamic", []))
            for label, body in d.items()
            if label == "statement"
            for c in as_list(body.get("content", []))
        ]
        for s in plain + dynamic:
            if LIFECYCLE & set(as_list(s.get("actions", []))):
                granting.append((name, s))
    if len(granting) != 1:
        failures.add(f"terraform/: expected one statement granting the lifecycle actions, found {len(granting)}")
        return
    statement = granting[0][1]
    conditions = [
        body
        for d in as_list(statement.get("dynamic", []))
        for label, body in d.items()
        if label == "condition"
    ]
    if len(conditions) != 1:
        failures.add("terraform/: the lifecycle statement needs one dynamic \"condition\" block on the managed tag")
        return
    dyn = conditions[0]
    if dyn.get("for_each") != f"${{local.{SWITCH_TF} ? [var.managed_tag] : []}}":
        failures.add(f"terraform/: the lifecycle condition must be for_each'd on local.{SWITCH_TF} ? [var.managed_tag] : []; found {dyn.get('for_each')}")
    content = as_list(dyn.get("content", [{}]))[0]
    want = {"test": "StringLike", "variable": "autoscaling:ResourceTag/${condition.value}", "values": ["*"]}
    if content != want:
        failures.add(f"terraform/: the lifecycle condition must be {want}; found {content}")
    if as_list(statement.get("condition", [])):
        failures.add("terraform/: the lifecycle statement carries a condition that is always on")


def main() -> None:
    failures = Failures("lifecycle")
    check_template(failures)
    check_terraform(failures)
    failures.finish(
        "both templates grant the lifecycle actions only in groups carrying the managed tag, "
        "when the managed-tag check and the switch are on (both default)"
    )


if __name__ == "__main__":
    main()
