"""After `terraform test` has destroyed what it applied into moto: moto holds nothing of the
kinds the module creates. Run with moto's venv Python (boto3), against AWS_ENDPOINT_URL.

A fresh moto server holds none of these, so anything found was left by the destroy."""

from __future__ import annotations

import sys

import boto3


def main() -> int:
    found: list[str] = []

    def check(what: str, names: list[str]) -> None:
        for name in names:
            found.append(f"{what} {name}")

    lam = boto3.client("lambda")
    check("Lambda function", [f["FunctionName"] for f in lam.list_functions()["Functions"]])
    events = boto3.client("events")
    check("EventBridge rule", [r["Name"] for r in events.list_rules()["Rules"]])
    check("SQS queue", boto3.client("sqs").list_queues().get("QueueUrls", []))
    iam = boto3.client("iam")
    check("IAM role", [r["RoleName"] for r in iam.list_roles()["Roles"] if not r["Path"].startswith("/aws-service-role/")])
    check("IAM policy", [p["PolicyName"] for p in iam.list_policies(Scope="Local")["Policies"]])
    check("log group", [g["logGroupName"] for g in boto3.client("logs").describe_log_groups()["logGroups"]])
    cloudwatch = boto3.client("cloudwatch")
    check("alarm", [a["AlarmName"] for a in cloudwatch.describe_alarms()["MetricAlarms"]])
    check("dashboard", [d["DashboardName"] for d in cloudwatch.list_dashboards()["DashboardEntries"]])
    sns = boto3.client("sns")
    check("SNS topic", [t["TopicArn"] for t in sns.list_topics()["Topics"]])
    check("SNS subscription", [s["SubscriptionArn"] for s in sns.list_subscriptions()["Subscriptions"]])

    if found:
        print("moto leftovers: FAILED: the destroy left", file=sys.stderr)
        for item in found:
            print(f"  - {item}", file=sys.stderr)
        return 1
    print("moto leftovers: ok: no function, rule, queue, role, policy, log group, alarm, dashboard, topic or subscription left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
