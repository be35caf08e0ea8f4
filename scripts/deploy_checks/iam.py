"""The IAM actions template.yaml and terraform/ grant the function's role, against the AWS
API calls the function's code makes (lambda/src, read by rust_scan: SDK operations and
requests it signs itself): none missing, none extra. An action granted only under a
condition (the webhook secret's) counts as granted.

Not compared with the code, because the code does not make these calls itself (Lambda makes
them with the function's role): CloudWatch Logs, which must name the function's own log group
(no AWSLambdaBasicExecutionRole, which allows every log group); the VPC network interfaces,
only under the VPC switch (no AWSLambdaVPCAccessExecutionRole, which allows logs everywhere);
sqs:SendMessage to the dead-letter queue (the on-failure destination).
The two templates must also grant each other's actions and no managed policy.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rust_scan  # noqa: E402
from common import LAMBDA_SRC, Failures, as_list, cfn_branches, cfn_resources, load_cfn, tf_module  # noqa: E402

# Granted for Lambda's own use, not for a call in the code.
LAMBDA_USES = {
    "sqs:SendMessage": "the on-failure destination (the dead-letter queue)",
    "logs:CreateLogStream": "the function's log (its own log group only)",
    "logs:PutLogEvents": "the function's log (its own log group only)",
    "ec2:CreateNetworkInterface": "network interfaces in a VPC (SubnetIds only)",
    "ec2:DescribeNetworkInterfaces": "network interfaces in a VPC (SubnetIds only)",
    "ec2:DescribeSubnets": "network interfaces in a VPC (SubnetIds only)",
    "ec2:DeleteNetworkInterface": "network interfaces in a VPC (SubnetIds only)",
    "ec2:AssignPrivateIpAddresses": "network interfaces in a VPC (SubnetIds only)",
    "ec2:UnassignPrivateIpAddresses": "network interfaces in a VPC (SubnetIds only)",
}
# None: the AWS managed policies Lambda offers allow logs actions on every log group.
MANAGED: set[str] = set()


def template_grants() -> tuple[set[str], set[str]]:
    """(actions, managed policy names) of the role the template's function runs as."""
    template = load_cfn()
    resources = cfn_resources(template)
    functions = [r for r in resources.values() if r["Type"] in ("AWS::Serverless::Function", "AWS::Lambda::Function")]
    if len(functions) != 1:
        raise SystemExit(f"template.yaml: expected one function, found {len(functions)}")
    role_ref = functions[0]["Properties"].get("Role")
    if not (isinstance(role_ref, dict) and "Fn::GetAtt" in role_ref):
        raise SystemExit("template.yaml: the function's Role must be !GetAtt <role>.Arn of a role in the template")
    role_id = role_ref["Fn::GetAtt"][0]
    role = resources[role_id]
    documents = [policy["PolicyDocument"] for policy in role["Properties"].get("Policies", [])]
    # Policies of their own that name the role (the lifecycle actions' policy).
    documents += [
        r["Properties"]["PolicyDocument"]
        for r in resources.values()
        if r["Type"] == "AWS::IAM::RolePolicy" and r["Properties"].get("RoleName") == {"Ref": role_id}
    ]
    actions: set[str] = set()
    for document in documents:
        for statement in cfn_branches(document["Statement"]):
            for s in as_list(statement):
                for s2 in cfn_branches(s):
                    if s2.get("Effect") == "Allow":
                        actions.update(as_list(s2["Action"]))
    managed = set()
    for arn in role["Properties"].get("ManagedPolicyArns", []):
        for value in cfn_branches(arn):
            managed.add(_policy_name(value))
    return actions, managed


def _policy_name(value: Any) -> str:
    text = value.get("Fn::Sub") if isinstance(value, dict) else value
    return str(text).rsplit("/", 1)[-1]


def terraform_grants() -> tuple[set[str], set[str]]:
    module = tf_module()
    documents = {k: v for k, v in module["data"].items() if k.startswith("aws_iam_policy_document.")}
    if not documents:
        raise SystemExit("terraform/: no aws_iam_policy_document for the function's role")
    actions: set[str] = set()
    for doc in documents.values():
        statements = list(as_list(doc.get("statement", [])))
        for dynamic in as_list(doc.get("dynamic", [])):
            for label, body in dynamic.items():
                if label == "statement":
                    statements.extend(as_list(body.get("content", [])))
        for s in statements:
            if s.get("effect", "Allow") == "Allow":
                actions.update(as_list(s.get("actions", [])))
    managed = set()
    for key, body in module["resource"].items():
        if key.startswith("aws_iam_role_policy_attachment."):
            managed.add(_policy_name(body["policy_arn"]))
    return actions, managed


def compare(name: str, granted: set[str], needed: dict[str, list[str]], failures: Failures) -> None:
    for action in sorted(set(needed) - granted):
        failures.add(f"{name}: missing {action} (called at {', '.join(needed[action])})")
    for action in sorted(granted - set(needed)):
        if action in LAMBDA_USES:
            continue
        if any(ch in action for ch in "*?"):
            failures.add(f"{name}: grants a wildcard action {action}")
            continue
        failures.add(f"{name}: grants {action}, which the code never calls")


LOGS = {"logs:CreateLogStream", "logs:PutLogEvents"}
VPC = {a for a, why in LAMBDA_USES.items() if "VPC" in why}


def check_logs_and_vpc(failures: Failures) -> None:
    """Logs actions on the function's own log group only; the VPC actions only in a VPC."""
    template = load_cfn()
    resources = cfn_resources(template)
    role = next(r for r in resources.values() if r["Type"] == "AWS::IAM::Role")
    for policy in role["Properties"].get("Policies", []):
        for statement in as_list(policy["PolicyDocument"]["Statement"]):
            conditional = isinstance(statement, dict) and set(statement) == {"Fn::If"}
            for s in cfn_branches(statement):
                actions = set(as_list(s.get("Action", [])))
                if actions & LOGS and (actions != LOGS or s.get("Resource") != {"Fn::GetAtt": ["LogGroup", "Arn"]}):
                    failures.add(f"template.yaml: logs actions must be exactly {sorted(LOGS)} on !GetAtt LogGroup.Arn; found {s}")
                if actions & VPC:
                    if not (conditional and statement["Fn::If"][0] == "HasVpc"):
                        failures.add(f"template.yaml: the network interface actions must be granted under HasVpc only; found {s}")
    module = tf_module()
    doc = module["data"].get("aws_iam_policy_document.function", {})
    for s in as_list(doc.get("statement", [])):
        actions = set(as_list(s.get("actions", [])))
        if actions & LOGS and (actions != LOGS or s.get("resources") != ["${aws_cloudwatch_log_group.function.arn}:*"]):
            failures.add(f"terraform/: logs actions must be exactly {sorted(LOGS)} on the function's log group; found {s}")
        if actions & VPC:
            failures.add(f"terraform/: the network interface actions must be granted only with local.use_vpc; found {s}")
    for d in as_list(doc.get("dynamic", [])):
        body = d.get("statement")
        if not body:
            continue
        for s in as_list(body.get("content", [])):
            if set(as_list(s.get("actions", []))) & VPC and body.get("for_each") != "${local.use_vpc ? [1] : []}":
                failures.add(f"terraform/: the network interface statement must be for_each'd on local.use_vpc; found {body.get('for_each')}")


def main() -> None:
    failures = Failures("iam")
    scan = rust_scan.scan(LAMBDA_SRC)
    for item in scan.unresolved:
        failures.add(item)
    needed = scan.actions

    t_actions, t_managed = template_grants()
    f_actions, f_managed = terraform_grants()
    compare("template.yaml", t_actions, needed, failures)
    compare("terraform/", f_actions, needed, failures)
    if t_actions != f_actions:
        failures.add(
            f"template.yaml and terraform/ grant different actions: only in the template {sorted(t_actions - f_actions)}, "
            f"only in terraform {sorted(f_actions - t_actions)}"
        )
    for name, managed in (("template.yaml", t_managed), ("terraform/", f_managed)):
        if managed != MANAGED:
            failures.add(f"{name}: managed policies {sorted(managed)}, expected {sorted(MANAGED)}")

    check_logs_and_vpc(failures)

    failures.finish(
        f"the code calls {', '.join(sorted(needed)) or 'nothing'}; both templates grant exactly that"
        f" (plus, for Lambda's own use, {', '.join(sorted(LAMBDA_USES))}), logs on the function's log group only, no managed policy"
    )


if __name__ == "__main__":
    main()
