# The module applied and destroyed for real, against moto's server (an emulated AWS), not a
# mocked provider: every resource is created through the AWS provider's real calls, then
# `terraform test` destroys them. Run by scripts/check-terraform-moto, which starts moto
# (MOTO_IAM_LOAD_MANAGED_POLICIES=true), points the provider at it with AWS_ENDPOINT_URL,
# builds a dummy zip (the function is never invoked here) and checks afterwards that moto
# holds none of the resources.
#
# Not in terraform/tests/ itself: `terraform test` there runs with a mocked provider in
# scripts/check-deploy, and these runs need moto. Run them with -test-directory=tests/moto.
#
# What moto cannot do, and so is left out or not asserted:
# - EKS access entries: moto has no access-entry API, so create_access_entry = false.
# - The function's logging_config: moto drops it, so a plan after this apply shows drift on
#   aws_lambda_function.this (logging_config). That is moto, not the module; no run here
#   re-plans, and nothing hides it (no ignore_changes).

variables {
  name                = "nth-moto"
  cluster_name        = "prod"
  cluster_endpoint    = "https://ABCDEF0123456789.gr7.us-east-1.eks.amazonaws.com"
  cluster_ca_data     = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg=="
  create_access_entry = false
  alarm_email         = "oncall@example.com"
  tags                = { app = "nth", test = "moto" }
}

provider "aws" {
  region                      = "us-east-1"
  skip_metadata_api_check     = true
  skip_region_validation      = true
  skip_credentials_validation = true
}

run "apply_everything" {
  command = apply

  assert {
    condition     = length(aws_cloudwatch_event_rule.this) == 7 && length(aws_cloudwatch_event_target.this) == 7 && length(aws_lambda_permission.events) == 7
    error_message = "one rule, target and permission per kind of event"
  }
  assert {
    condition     = alltrue([for k, r in aws_cloudwatch_event_rule.this : jsondecode(r.event_pattern).account == [data.aws_caller_identity.current.account_id]])
    error_message = "every rule pins the account moto reports"
  }
  assert {
    condition     = alltrue([for k, t in aws_cloudwatch_event_target.this : t.arn == aws_lambda_function.this.arn])
    error_message = "every rule targets the function"
  }
  assert {
    condition     = aws_lambda_function.this.function_name == "nth-moto" && aws_lambda_function.this.environment[0].variables["CLUSTER_NAME"] == "prod"
    error_message = "the function exists with its environment"
  }
  assert {
    condition     = aws_lambda_function_event_invoke_config.this.destination_config[0].on_failure[0].destination == aws_sqs_queue.dead_letter.arn
    error_message = "failed events go to the dead-letter queue"
  }
  assert {
    condition     = aws_iam_role_policy.function.role == aws_iam_role.function.id && aws_iam_role_policy.continue_drain.role == aws_iam_role.function.id
    error_message = "both inline policies are on the role"
  }
  assert {
    condition     = aws_cloudwatch_log_group.function.name == "/aws/lambda/nth-moto" && aws_cloudwatch_log_group.function.retention_in_days == 30
    error_message = "the log group exists with its retention"
  }
  assert {
    condition     = length(aws_cloudwatch_metric_alarm.this) == 4 && length(aws_cloudwatch_dashboard.this) == 1
    error_message = "the four alarms and the dashboard exist"
  }
  assert {
    condition     = length(aws_sns_topic.alarms) == 1 && aws_sns_topic_subscription.alarm_email[0].endpoint == "oncall@example.com"
    error_message = "the alarm topic exists with the address subscribed"
  }
  assert {
    condition     = length(aws_eks_access_entry.function) == 0 && length(aws_eks_access_entry.clusters) == 0
    error_message = "no access entry: moto has no access-entry API"
  }
}
