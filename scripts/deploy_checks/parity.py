"""template.yaml and terraform/ describe the same system, and both set what the code reads:

- every SAM parameter is a Terraform variable of the snake_case name, with the same default
  (Terraform's own: name, tags, lambda_zip_path);
- the function's environment has the same variables in both, each fed by the same setting,
  and they are exactly the variables the code reads (lambda/src, read by rust_scan);
- one EventBridge rule per kind in both, with the same pattern and the same switch;
- the same function, retry and queue settings.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rust_scan  # noqa: E402
from common import LAMBDA_SRC, Failures, hcl_object_to_python, load_cfn, snake, tf_module  # noqa: E402

TERRAFORM_ONLY = {"name", "tags", "lambda_zip_path"}
# Read by the code, deliberately not offered by the templates.
NOT_OFFERED = {
    "WEBHOOK_URL": "the URL of a chat webhook is a credential: deployments keep it in Secrets Manager (WebhookUrlSecretArn)",
    "WEBHOOK_HEADERS": "may hold a credential, which would sit in plain text in the function's configuration",
}
# Read by the code but set by Lambda or the AWS SDK, not by the templates.
NOT_CONFIGURED = re.compile(r"^(AWS_|_X_AMZN_|LAMBDA_)")
GROUP_FILTER = "<detail.AutoScalingGroupName from AutoScalingGroupNames, when set>"


def tf_var(expr: Any) -> str | None:
    """`${var.x}`, `${tostring(var.x)}`, `${var.x == null ? "" : tostring(var.x)}` -> x."""
    names = set(re.findall(r"\bvar\.(\w+)", str(expr)))
    return names.pop() if len(names) == 1 else None


def cfn_param(expr: Any) -> str | None:
    """!Ref X, or !If [cond, !Ref X, !Ref AWS::NoValue] -> X."""
    if isinstance(expr, dict) and "Ref" in expr:
        return expr["Ref"]
    if isinstance(expr, dict) and "Fn::Join" in expr:  # !Join [",", !Ref List]
        return cfn_param(expr["Fn::Join"][1])
    if isinstance(expr, dict) and "Fn::If" in expr:
        refs = {cfn_param(b) for b in expr["Fn::If"][1:]} - {"AWS::NoValue", None}
        return refs.pop() if len(refs) == 1 else None
    return None


def same_default(cfn: dict[str, Any], tf: dict[str, Any]) -> bool:
    sam = cfn.get("Default")
    has_tf_default = "default" in tf
    tfd = tf.get("default")
    if sam is None:
        return not has_tf_default
    if not has_tf_default:
        return False
    if cfn["Type"] == "CommaDelimitedList":
        return (sam == "" and tfd == []) or sam.split(",") == tfd
    if sam == "":
        return tfd in (None, "")
    if sam in ("true", "false"):
        return tfd is (sam == "true") or tfd == sam
    if cfn["Type"] == "Number":
        return float(sam) == float(tfd)
    return str(sam) == str(tfd)


def template_rules(template: dict[str, Any]) -> dict[str, tuple[str | None, Any]]:
    """detail-type -> (switch parameter, pattern)."""
    conditions = template.get("Conditions", {})
    rules = {}
    for resource in template["Resources"].values():
        if resource["Type"] != "AWS::Events::Rule":
            continue
        cond = conditions.get(resource.get("Condition", ""), {})
        switch = None
        if "Fn::Equals" in cond:
            switch = next((x["Ref"] for x in cond["Fn::Equals"] if isinstance(x, dict) and "Ref" in x), None)
        pattern = dict(resource["Properties"]["EventPattern"])
        if isinstance(pattern.get("detail"), dict) and "Fn::If" in pattern["detail"]:
            pattern["detail"] = GROUP_FILTER
        for detail_type in pattern["detail-type"]:
            rules[detail_type] = (switch, pattern)
    return rules


def terraform_rules(module: dict[str, Any]) -> dict[str, tuple[str | None, Any]]:
    rules = {}
    for rule in module["locals"].get("rules", {}).values():
        text = str(rule["pattern"])
        m = re.fullmatch(r"\$\{jsonencode\((merge\()?(\{.*\})(, local\.group_filter\))?\)\}", text)
        if not m:
            raise SystemExit(f"terraform/: cannot read the pattern {text}")
        pattern = hcl_object_to_python(m.group(2))
        if m.group(3):
            pattern["detail"] = GROUP_FILTER
        for detail_type in pattern["detail-type"]:
            rules[detail_type] = (tf_var(rule["enabled"]), pattern)
    return rules


def main() -> None:
    failures = Failures("parity")
    template = load_cfn()
    module = tf_module()
    params: dict[str, Any] = template["Parameters"]
    variables: dict[str, Any] = module["variable"]

    # Parameters and variables.
    for name, p in params.items():
        var = snake(name)
        if var not in variables:
            failures.add(f"parameter {name} has no Terraform variable {var}")
        elif not same_default(p, variables[var]):
            failures.add(f"parameter {name} defaults to {p.get('Default')!r}, variable {var} to {variables[var].get('default')!r}")
    for var in sorted(set(variables) - {snake(n) for n in params} - TERRAFORM_ONLY):
        failures.add(f"variable {var} has no parameter in template.yaml")

    # Environment.
    functions = [r for r in template["Resources"].values() if r["Type"] == "AWS::Serverless::Function"]
    props = functions[0]["Properties"]
    t_env = {k: cfn_param(v) for k, v in props["Environment"]["Variables"].items()}
    locals_ = module["locals"]
    f_env = {k: tf_var(v) for k, v in {**locals_["required_environment"], **locals_["optional_environment"]}.items()}
    for key in sorted(set(t_env) | set(f_env)):
        if key not in t_env or key not in f_env:
            failures.add(f"environment variable {key} is set only in {'template.yaml' if key in t_env else 'terraform/'}")
        elif t_env[key] is None or f_env[key] is None or snake(t_env[key]) != f_env[key]:
            failures.add(f"environment variable {key} comes from parameter {t_env[key]} but from variable {f_env[key]}")
    code_env = {k: v for k, v in rust_scan.scan(LAMBDA_SRC).env.items() if not NOT_CONFIGURED.match(k) and k not in NOT_OFFERED}
    for key in sorted(set(code_env) - set(t_env)):
        failures.add(f"the code reads {key} ({', '.join(code_env[key])}) but the templates do not set it")
    for key in sorted(set(t_env) - set(code_env)):
        failures.add(f"the templates set {key} but the code never reads it")

    # Rules.
    t_rules, f_rules = template_rules(template), terraform_rules(module)
    for detail_type in sorted(set(t_rules) | set(f_rules)):
        if detail_type not in t_rules or detail_type not in f_rules:
            failures.add(f"rule for {detail_type!r} only in {'template.yaml' if detail_type in t_rules else 'terraform/'}")
            continue
        (t_switch, t_pattern), (f_switch, f_pattern) = t_rules[detail_type], f_rules[detail_type]
        if t_pattern != f_pattern:
            failures.add(f"rule for {detail_type!r}: template pattern {t_pattern} != terraform pattern {f_pattern}")
        if t_switch is None or f_switch != snake(t_switch):
            failures.add(f"rule for {detail_type!r}: switched by parameter {t_switch} but variable {f_switch}")

    # Settings written as literals in both.
    res = template["Resources"]
    invoke = next(r for r in res.values() if r["Type"] == "AWS::Lambda::EventInvokeConfig")["Properties"]
    queue = next(r for r in res.values() if r["Type"] == "AWS::SQS::Queue")["Properties"]
    tf_res = module["resource"]
    tf_fn = tf_res["aws_lambda_function.this"]
    tf_invoke = tf_res["aws_lambda_function_event_invoke_config.this"]
    tf_queue = tf_res["aws_sqs_queue.dead_letter"]
    pairs = [
        ("runtime", props["Runtime"], tf_fn["runtime"]),
        ("handler", props["Handler"], tf_fn["handler"]),
        ("log format", props["LoggingConfig"]["LogFormat"], tf_fn["logging_config"][0]["log_format"]),
        ("maximum retry attempts", invoke["MaximumRetryAttempts"], tf_invoke["maximum_retry_attempts"]),
        ("maximum event age", invoke["MaximumEventAgeInSeconds"], tf_invoke["maximum_event_age_in_seconds"]),
        ("queue retention", queue["MessageRetentionPeriod"], tf_queue["message_retention_seconds"]),
        ("queue encryption", queue["SqsManagedSseEnabled"], tf_queue["sqs_managed_sse_enabled"]),
    ]
    for what, t, f in pairs:
        if str(t).lower() != str(f).lower():
            failures.add(f"{what}: template.yaml {t!r}, terraform/ {f!r}")

    failures.finish(
        f"{len(params)} parameters = variables, {len(t_env)} environment variables = what the code reads, "
        f"{len(t_rules)} rules, function/retry/queue settings agree"
    )


if __name__ == "__main__":
    main()
