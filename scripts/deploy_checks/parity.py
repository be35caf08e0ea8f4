"""template.yaml and terraform/ describe the same system, and both set what the code reads:

- every SAM parameter is a Terraform variable of the snake_case name, with the same default
  (Terraform's own: name, tags, lambda_zip_path);
- the function's environment has the same variables in both, each fed by the same setting,
  and they are exactly the variables the code reads (lambda/src and the shared settings in
  core/src, read by rust_scan);
- one EventBridge rule per kind in both, with the same pattern and the same switch, each
  pattern pinning `account` to the deployment's own account;
- every constraint a parameter has (AllowedValues, AllowedPattern, MinValue, MaxValue) has a
  validation on the variable (the same values, the same regex);
- the same function, retry and queue settings;
- the same alarms (metric, statistic, dimensions, threshold, description, actions) and the
  same dashboard, both behind the switch CreateDashboardAndAlarms.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rust_scan  # noqa: E402
from common import CORE_SRC, LAMBDA_SRC, Failures, cfn_resources, hcl_object_to_python, load_cfn, snake, tf_module  # noqa: E402

TERRAFORM_ONLY = {"name", "tags", "lambda_zip_path"}
# Read by the code, deliberately not offered by the templates.
NOT_OFFERED = {
    "WEBHOOK_URL": "the URL of a chat webhook is a credential: deployments keep it in Secrets Manager (WebhookUrlSecretArn)",
    "WEBHOOK_HEADERS": "may hold a credential, which would sit in plain text in the function's configuration",
}
# Read by the code but set by Lambda or the AWS SDK, not by the templates.
NOT_CONFIGURED = re.compile(r"^(AWS_|_X_AMZN_|LAMBDA_)")
GROUP_FILTER = "<detail.AutoScalingGroupName from AutoScalingGroupNames, when set>"
ACCOUNT = "<this account>"


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
        # ManagedTag: a list of one in the template (Fn::ForEach's collection), a string here.
        if tf.get("type") == "${string}" or isinstance(tfd, str):
            return [sam] == sam.split(",") and sam == tfd
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
    for resource in cfn_resources(template).values():
        if resource["Type"] != "AWS::Events::Rule":
            continue
        cond = conditions.get(resource.get("Condition", ""), {})
        switch = None
        if "Fn::Equals" in cond:
            switch = next((x["Ref"] for x in cond["Fn::Equals"] if isinstance(x, dict) and "Ref" in x), None)
        pattern = dict(resource["Properties"]["EventPattern"])
        if isinstance(pattern.get("detail"), dict) and "Fn::If" in pattern["detail"]:
            pattern["detail"] = GROUP_FILTER
        if pattern.get("account") == [{"Ref": "AWS::AccountId"}]:
            pattern["account"] = [ACCOUNT]
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
        pattern = hcl_object_to_python(m.group(2).replace("[local.account_id]", f'["{ACCOUNT}"]'))
        if m.group(3):
            pattern["detail"] = GROUP_FILTER
        for detail_type in pattern["detail-type"]:
            rules[detail_type] = (tf_var(rule["enabled"]), pattern)
    return rules


# The references the dashboards and alarms make, by name in each template.
SAM_REFS = {
    "MetricsNamespace": "<namespace>",
    "AWS::Region": "<region>",
    "Function": "<function>",
    "DeadLetterQueue.QueueName": "<queue>",
}
TF_REFS = {
    "var.metrics_namespace": "<namespace>",
    "local.region": "<region>",
    "aws_lambda_function.this.function_name": "<function>",
    "aws_sqs_queue.dead_letter.name": "<queue>",
}
ALARM_SETTINGS = {  # AWS::CloudWatch::Alarm property -> aws_cloudwatch_metric_alarm argument
    "Period": "period",
    "EvaluationPeriods": "evaluation_periods",
    "Threshold": "threshold",
    "ComparisonOperator": "comparison_operator",
    "TreatMissingData": "treat_missing_data",
}


def cfn_value(expr: Any) -> Any:
    """A literal, or the placeholder of a !Ref / !GetAtt the dashboards and alarms use."""
    if isinstance(expr, dict) and "Ref" in expr:
        return SAM_REFS.get(expr["Ref"], expr["Ref"])
    if isinstance(expr, dict) and "Fn::GetAtt" in expr:
        att = expr["Fn::GetAtt"]
        name = att if isinstance(att, str) else ".".join(att)
        return SAM_REFS.get(name, name)
    return expr


def tf_value(expr: Any) -> Any:
    """A literal, or the placeholder of an interpolated reference; HCL escapes decoded."""
    if isinstance(expr, str):
        m = re.fullmatch(r"\$\{([\w.]+)\}", expr)
        if m:
            return TF_REFS.get(m.group(1), expr)
        text = re.sub(r"\$\{([\w.]+)\}", lambda m: TF_REFS.get(m.group(1), m.group(0)), expr)
        # HCL string escapes (the ones these templates use): \n, \" and \\.
        return re.sub(r'\\(["n\\])', lambda m: "\n" if m.group(1) == "n" else m.group(1), text)
    if isinstance(expr, list):
        return [tf_value(v) for v in expr]
    if isinstance(expr, dict):
        return {k: tf_value(v) for k, v in expr.items()}
    return expr


def template_alarms(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    alarms = {}
    for rid, r in cfn_resources(template).items():
        if r["Type"] != "AWS::CloudWatch::Alarm":
            continue
        p = r["Properties"]
        m = re.fullmatch(r"\$\{AWS::StackName\}-(.+)", p.get("AlarmName", {}).get("Fn::Sub", ""))
        key = m.group(1) if m else rid
        alarms[key] = {
            "switch": r.get("Condition"),
            "description": " ".join(str(p.get("AlarmDescription", "")).split()),
            "namespace": cfn_value(p["Namespace"]),
            "metric": p["MetricName"],
            "statistic": p["Statistic"],
            "dimensions": {d["Name"]: cfn_value(d["Value"]) for d in p.get("Dimensions", [])},
            "actions": "AlarmActions" in p and "OKActions" in p,
            **{k: str(p.get(k)) for k in ALARM_SETTINGS},
        }
    return alarms


def terraform_alarms(module: dict[str, Any]) -> dict[str, dict[str, Any]]:
    resource = module["resource"].get("aws_cloudwatch_metric_alarm.this")
    if resource is None:
        return {}
    alarms = {}
    for key, a in module["locals"].get("alarms", {}).items():
        alarms[key] = {
            "switch": resource["for_each"],
            "description": " ".join(a["description"].split()),
            "namespace": tf_value(a["namespace"]),
            "metric": a["metric_name"],
            "statistic": a["statistic"],
            "dimensions": tf_value(a["dimensions"]),
            "actions": resource.get("alarm_actions") == resource.get("ok_actions") == "${local.alarm_actions}",
            **{k: str(resource.get(v)) for k, v in ALARM_SETTINGS.items()},
        }
    return alarms


def template_dashboard(template: dict[str, Any]) -> list[Any] | None:
    boards = [r for r in cfn_resources(template).values() if r["Type"] == "AWS::CloudWatch::Dashboard"]
    if not boards:
        return None
    body = boards[0]["Properties"]["DashboardBody"]["Fn::Sub"]
    body = re.sub(r"\$\{([\w:.]+)\}", lambda m: SAM_REFS.get(m.group(1), m.group(0)), body)
    widgets = json.loads(body)["widgets"]
    for w in widgets:
        if w["type"] == "alarm":
            w["properties"]["alarms"] = "<alarms>"
    return widgets


def terraform_dashboard(module: dict[str, Any]) -> list[Any] | None:
    if "aws_cloudwatch_dashboard.this" not in module["resource"]:
        return None
    widgets = tf_value(module["locals"]["dashboard_widgets"])
    for w in widgets:
        if w["type"] == "alarm":
            w["properties"]["alarms"] = "<alarms>"
    return widgets


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
    # What the template refuses, the module refuses too.
    for name, p in params.items():
        var = variables.get(snake(name))
        if var is None:
            continue
        values = p.get("AllowedValues")
        if values in (["true", "false"], ["false", "true"]):
            values = None  # a bool variable
        if not (values or p.get("AllowedPattern") or "MinValue" in p or "MaxValue" in p):
            continue
        conditions = " ".join(str(v.get("condition", "")) for v in var.get("validation", []))
        if not conditions:
            failures.add(f"parameter {name} is constrained (AllowedValues/AllowedPattern/MinValue/MaxValue) but variable {snake(name)} has no validation")
            continue
        for value in values or []:
            if not re.search(rf'(?<![\w.]){re.escape(str(value))}(?![\w.])', conditions):
                failures.add(f"parameter {name} allows {value!r}, which variable {snake(name)}'s validation does not name")
        for regex in re.findall(r'regex\("((?:[^"\\]|\\.)*)"', conditions):
            regex = regex.replace("\\\\", "\\")
            pattern = p.get("AllowedPattern", "")
            if regex not in (pattern, pattern.removeprefix("^$|")):
                failures.add(f"parameter {name}'s AllowedPattern {pattern!r} differs from variable {snake(name)}'s regex {regex!r}")

    # Environment.
    functions = [r for r in cfn_resources(template).values() if r["Type"] == "AWS::Serverless::Function"]
    props = functions[0]["Properties"]
    t_env = {k: cfn_param(v) for k, v in props["Environment"]["Variables"].items()}
    locals_ = module["locals"]
    f_env = {k: tf_var(v) for k, v in {**locals_["required_environment"], **locals_["optional_environment"]}.items()}
    for key in sorted(set(t_env) | set(f_env)):
        if key not in t_env or key not in f_env:
            failures.add(f"environment variable {key} is set only in {'template.yaml' if key in t_env else 'terraform/'}")
        elif t_env[key] is None or f_env[key] is None or snake(t_env[key]) != f_env[key]:
            failures.add(f"environment variable {key} comes from parameter {t_env[key]} but from variable {f_env[key]}")
    read = {**rust_scan.scan(CORE_SRC).env, **rust_scan.scan(LAMBDA_SRC).env}
    code_env = {k: v for k, v in read.items() if not NOT_CONFIGURED.match(k) and k not in NOT_OFFERED}
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
        # Events about another account's resources (a bus that receives them) are not ours.
        for name, pattern in (("template.yaml", t_pattern), ("terraform/", f_pattern)):
            if pattern.get("account") != [ACCOUNT]:
                failures.add(f"rule for {detail_type!r} in {name} does not pin account to this account: {pattern.get('account')}")
        if t_switch is None or f_switch != snake(t_switch):
            failures.add(f"rule for {detail_type!r}: switched by parameter {t_switch} but variable {f_switch}")

    # Settings written as literals in both.
    res = cfn_resources(template)
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

    # Dashboard and alarms.
    conditions = template.get("Conditions", {})
    monitoring = conditions.get("Monitoring", {}).get("Fn::Equals", [])
    if {"Ref": "CreateDashboardAndAlarms"} not in monitoring:
        failures.add("template.yaml: condition Monitoring is not the switch CreateDashboardAndAlarms")
    if module["locals"].get("monitoring") != "${var.create_dashboard_and_alarms}":
        failures.add("terraform/: local.monitoring is not the switch create_dashboard_and_alarms")
    t_alarms, f_alarms = template_alarms(template), terraform_alarms(module)
    if not t_alarms:
        failures.add("template.yaml has no alarms")
    for key in sorted(set(t_alarms) | set(f_alarms)):
        if key not in t_alarms or key not in f_alarms:
            failures.add(f"alarm {key} only in {'template.yaml' if key in t_alarms else 'terraform/'}")
            continue
        t, f = dict(t_alarms[key]), dict(f_alarms[key])
        if t.pop("switch") != "Monitoring" or f.pop("switch") != "${local.monitoring ? local.alarms : {}}":
            failures.add(f"alarm {key} is not behind the switch in both")
        if not t["actions"] or not f["actions"]:
            failures.add(f"alarm {key} does not notify the alarm topic (on alarm and on recovery) in both")
        for field in t:
            if t[field] != f[field]:
                failures.add(f"alarm {key}: {field} is {t[field]!r} in template.yaml, {f[field]!r} in terraform/")
    t_board, f_board = template_dashboard(template), terraform_dashboard(module)
    if t_board is None or f_board is None:
        failures.add(f"the dashboard is missing in {'terraform/' if t_board is not None else 'template.yaml'}")
    elif t_board != f_board:
        for i, (t, f) in enumerate(zip(t_board, f_board)):
            if t != f:
                failures.add(f"dashboard widget {i}: template.yaml {json.dumps(t)} != terraform/ {json.dumps(f)}")
        if len(t_board) != len(f_board):
            failures.add(f"dashboard: {len(t_board)} widgets in template.yaml, {len(f_board)} in terraform/")

    failures.finish(
        f"{len(params)} parameters = variables, {len(t_env)} environment variables = what the code reads, "
        f"{len(t_rules)} rules, function/retry/queue settings agree, "
        f"{len(t_alarms)} alarms and a {len(t_board or [])}-widget dashboard agree"
    )


if __name__ == "__main__":
    main()
