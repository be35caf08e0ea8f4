# `terraform test` with a mocked AWS provider: plans the module without credentials or
# network (Terraform 1.7 or later and the hashicorp/aws provider installed; scripts/check-deploy
# runs it when a local provider mirror exists).

mock_provider "aws" {
  override_data {
    target = data.aws_partition.current
    values = { partition = "aws" }
  }
  override_data {
    target = data.aws_caller_identity.current
    values = { account_id = "123456789012" }
  }
  override_data {
    target = data.aws_region.current
    values = { name = "us-east-1" }
  }
  # Known at plan, so that the role's policy document (which names it) is read at plan.
  override_resource {
    target          = aws_cloudwatch_log_group.function
    override_during = plan
    values          = { arn = "arn:aws:logs:us-east-1:123456789012:log-group:/aws/lambda/nth" }
  }
}

variables {
  cluster_name     = "prod"
  cluster_endpoint = "https://ABC.gr7.us-east-1.eks.amazonaws.com"
  cluster_ca_data  = "LS0tLS1CRUdJTg=="
  # Any existing file: a plan only hashes it.
  lambda_zip_path = "tests/plan.tftest.hcl"
}

run "defaults" {
  command = plan

  assert {
    condition     = length(aws_cloudwatch_event_rule.this) == 7
    error_message = "every kind of event has its rule by default"
  }
  assert {
    condition     = length(aws_lambda_permission.events) == 7 && length(aws_cloudwatch_event_target.this) == 7
    error_message = "every rule has a target and a permission"
  }
  assert {
    condition = alltrue([
      for kind, p in aws_lambda_permission.events :
      p.principal == "events.amazonaws.com" && p.action == "lambda:InvokeFunction"
    ])
    error_message = "permissions are for EventBridge only"
  }
  assert {
    condition = alltrue([
      for kind, rule in aws_cloudwatch_event_rule.this :
      jsondecode(rule.event_pattern).account == ["123456789012"]
    ])
    error_message = "every rule matches events of this account only"
  }
  assert {
    condition = jsondecode(aws_cloudwatch_event_rule.this["scheduled-change"].event_pattern) == {
      account       = ["123456789012"]
      source        = ["aws.health"]
      "detail-type" = ["AWS Health Event"]
      detail = {
        service           = ["EC2"]
        eventTypeCategory = ["scheduledChange"]
        "$or" = [
          { statusCode = ["upcoming", "open"] },
          { statusCode = [{ exists = false }] },
          {
            statusCode    = ["closed"]
            eventTypeCode = ["AWS_EC2_SYSTEM_REBOOT_MAINTENANCE_SCHEDULED", "AWS_EC2_INSTANCE_REBOOT_MAINTENANCE_SCHEDULED"]
          },
        ]
      }
    }
    error_message = "the Health rule is limited to EC2 scheduledChange, and closed events to reboot maintenance"
  }
  assert {
    condition     = !can(jsondecode(aws_cloudwatch_event_rule.this["terminate-lifecycle-action"].event_pattern).detail)
    error_message = "with no group names, lifecycle rules match every group"
  }
  assert {
    condition = aws_lambda_function.this.environment[0].variables == tomap({
      CLUSTER_NAME                       = "prod"
      CLUSTER_ENDPOINT                   = "https://ABC.gr7.us-east-1.eks.amazonaws.com"
      CLUSTER_CA_DATA                    = "LS0tLS1CRUdJTg=="
      TAINT_PREFIX                       = "node-termination-handler"
      TAINT_EFFECT                       = "NoSchedule"
      DRY_RUN                            = "false"
      REBALANCE_DRAIN                    = "false"
      MANAGED_TAG                        = "node-termination-handler/managed"
      CHECK_MANAGED_TAG                  = "true"
      LEAVE_KARPENTER_NODES              = "false"
      DRAIN_CONCURRENCY                  = "16"
      EVICTION_RETRY_SECONDS             = "5"
      DRAIN_EMPTYDIR_PODS                = "true"
      DRAIN_UNMANAGED_PODS               = "true"
      EXCLUDE_FROM_LOAD_BALANCERS        = "false"
      OUT_OF_SERVICE_TAINT               = "false"
      MAX_DRAIN_SECONDS                  = "3600"
      LIFECYCLE_COMPLETION_DELAY_SECONDS = "0"
      LOG_LEVEL                          = "info"
      METRICS_NAMESPACE                  = "NodeTerminationHandler"
      WEBHOOK_FORMAT                     = "json"
    })
    error_message = "the environment holds the defaults, optional settings left out"
  }
  assert {
    condition = (
      aws_lambda_function.this.runtime == "provided.al2023" &&
      aws_lambda_function.this.architectures == tolist(["arm64"]) &&
      aws_lambda_function.this.memory_size == 128 &&
      aws_lambda_function.this.timeout == 900 &&
      aws_lambda_function.this.reserved_concurrent_executions == -1 &&
      aws_lambda_function.this.logging_config[0].log_format == "JSON" &&
      length(aws_lambda_function.this.vpc_config) == 0
    )
    error_message = "function settings"
  }
  assert {
    condition = (
      aws_lambda_function_event_invoke_config.this.maximum_retry_attempts == 2 &&
      aws_lambda_function_event_invoke_config.this.maximum_event_age_in_seconds == 21600 &&
      aws_sqs_queue.dead_letter.sqs_managed_sse_enabled &&
      aws_sqs_queue.dead_letter.message_retention_seconds == 1209600
    )
    error_message = "failed events are retried twice, then kept for 14 days"
  }
  assert {
    condition     = data.aws_iam_policy_document.function.statement[1].resources == toset(["arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:*:autoScalingGroupName/*"])
    error_message = "lifecycle actions on every group of this account and region"
  }
  assert {
    condition     = [for st in data.aws_iam_policy_document.function.statement : st.sid] == ["Describe", "LifecycleActions", "Logs", "DeadLetterQueue"]
    error_message = "no VPC statement outside a VPC, no secret statement without a secret, no eks:DescribeCluster with cluster_endpoint"
  }
  assert {
    condition = one([
      for st in data.aws_iam_policy_document.function.statement : st if st.sid == "Logs"
      ]).resources == toset(["arn:aws:logs:us-east-1:123456789012:log-group:/aws/lambda/nth:*"]) && one([
      for st in data.aws_iam_policy_document.function.statement : st if st.sid == "Logs"
    ]).actions == toset(["logs:CreateLogStream", "logs:PutLogEvents"])
    error_message = "logs only to the function's own log group"
  }
  assert {
    condition = [
      for c in data.aws_iam_policy_document.function.statement[1].condition :
      [c.test, c.variable, toset(c.values)]
    ] == [["StringLike", "autoscaling:ResourceTag/node-termination-handler/managed", toset(["*"])]]
    error_message = "lifecycle actions only in groups that carry the managed tag"
  }
  assert {
    condition     = length(aws_eks_access_entry.function) == 1 && length(aws_eks_access_entry.clusters) == 0
    error_message = "one access entry, in cluster_name"
  }
  assert {
    condition     = aws_eks_access_entry.function[0].kubernetes_groups == toset(["nth-node-termination-handler"]) && aws_eks_access_entry.function[0].type == "STANDARD"
    error_message = "the access entry maps the role to the group deploy/rbac.yaml binds"
  }
  assert {
    condition     = toset(keys(aws_cloudwatch_metric_alarm.this)) == toset(["dead-letter-queue", "errors", "function-errors", "drains-incomplete"])
    error_message = "alarms on the dead-letter queue, on errors and on incomplete drains by default"
  }
  assert {
    condition = alltrue([
      for key, a in aws_cloudwatch_metric_alarm.this :
      a.threshold == 0 && a.comparison_operator == "GreaterThanThreshold" && a.treat_missing_data == "notBreaching" && length(a.alarm_actions) == 0
    ])
    error_message = "every alarm fires above zero, and has no action without a topic"
  }
  assert {
    condition = (
      aws_cloudwatch_metric_alarm.this["dead-letter-queue"].namespace == "AWS/SQS" &&
      aws_cloudwatch_metric_alarm.this["dead-letter-queue"].metric_name == "ApproximateNumberOfMessagesVisible" &&
      aws_cloudwatch_metric_alarm.this["errors"].namespace == "NodeTerminationHandler" &&
      aws_cloudwatch_metric_alarm.this["errors"].metric_name == "Errors" &&
      length(aws_cloudwatch_metric_alarm.this["errors"].dimensions) == 0 &&
      aws_cloudwatch_metric_alarm.this["function-errors"].namespace == "AWS/Lambda" &&
      aws_cloudwatch_metric_alarm.this["function-errors"].dimensions == tomap({ FunctionName = "nth" })
    )
    error_message = "the alarms watch the queue's depth, nth's dimensionless Errors and the function's Errors"
  }
  assert {
    condition     = length(aws_cloudwatch_dashboard.this) == 1 && length(aws_sns_topic.alarms) == 0
    error_message = "a dashboard, and no topic without alarm_email"
  }
}

run "restricted_private_and_notifying" {
  command = plan

  variables {
    architecture                    = "x86_64"
    auto_scaling_group_names        = ["eks-workers-a", "eks-workers-b"]
    subnet_ids                      = ["subnet-1", "subnet-2"]
    security_group_ids              = ["sg-1"]
    webhook_url_secret_arn          = "arn:aws:secretsmanager:us-east-1:123456789012:secret:nth-webhook-AbCdEf"
    pod_termination_grace_period    = 30
    exclude_namespaces              = ["kube-system", "nth"]
    reserved_concurrent_executions  = 10
    enable_rebalance_recommendation = false
    create_access_entry             = false
  }

  assert {
    condition = data.aws_iam_policy_document.function.statement[1].resources == toset([
      "arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:*:autoScalingGroupName/eks-workers-a",
      "arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:*:autoScalingGroupName/eks-workers-b",
    ])
    error_message = "lifecycle actions only on the named groups"
  }
  assert {
    condition = jsondecode(aws_cloudwatch_event_rule.this["launch-lifecycle-action"].event_pattern).detail == {
      AutoScalingGroupName = ["eks-workers-a", "eks-workers-b"]
    }
    error_message = "lifecycle rules match only the named groups"
  }
  assert {
    condition     = length(aws_cloudwatch_event_rule.this) == 6 && !contains(keys(aws_cloudwatch_event_rule.this), "rebalance-recommendation")
    error_message = "a disabled kind has no rule"
  }
  assert {
    condition = (
      one([for st in data.aws_iam_policy_document.function.statement : st if st.sid == "WebhookUrlSecret"]).actions == toset(["secretsmanager:GetSecretValue"]) &&
      one([for st in data.aws_iam_policy_document.function.statement : st if st.sid == "WebhookUrlSecret"]).resources == toset(["arn:aws:secretsmanager:us-east-1:123456789012:secret:nth-webhook-AbCdEf"])
    )
    error_message = "the role reads exactly the webhook secret"
  }
  assert {
    condition = (
      aws_lambda_function.this.environment[0].variables["WEBHOOK_URL_SECRET_ARN"] == "arn:aws:secretsmanager:us-east-1:123456789012:secret:nth-webhook-AbCdEf" &&
      aws_lambda_function.this.environment[0].variables["POD_TERMINATION_GRACE_PERIOD"] == "30" &&
      aws_lambda_function.this.environment[0].variables["EXCLUDE_NAMESPACES"] == "kube-system,nth" &&
      !contains(keys(aws_lambda_function.this.environment[0].variables), "EXCLUDE_POD_LABELS")
    )
    error_message = "optional settings reach the environment when set"
  }
  assert {
    condition     = one([for st in data.aws_iam_policy_document.function.statement : st if st.sid == "Vpc"]).resources == toset(["*"]) && length(one([for st in data.aws_iam_policy_document.function.statement : st if st.sid == "Vpc"]).actions) == 6
    error_message = "the network interface statement is there in a VPC"
  }
  assert {
    condition = (
      aws_lambda_function.this.vpc_config[0].subnet_ids == toset(["subnet-1", "subnet-2"]) &&
      aws_lambda_function.this.vpc_config[0].security_group_ids == toset(["sg-1"])
    )
    error_message = "the function runs in the given subnets"
  }
  assert {
    condition     = aws_lambda_function.this.reserved_concurrent_executions == 10
    error_message = "reserved concurrency follows the variable"
  }
  assert {
    condition     = aws_lambda_function.this.architectures == tolist(["x86_64"])
    error_message = "architecture follows the variable"
  }
  assert {
    condition     = length(aws_eks_access_entry.function) == 0
    error_message = "no access entry when create_access_entry is false"
  }
}

run "alarms_by_email" {
  command = plan

  variables {
    alarm_email       = "oncall@example.com"
    metrics_namespace = "Custom/NTH"
  }

  assert {
    condition     = length(aws_sns_topic.alarms) == 1 && aws_sns_topic_subscription.alarm_email[0].endpoint == "oncall@example.com" && aws_sns_topic_subscription.alarm_email[0].protocol == "email"
    error_message = "alarm_email creates a topic with the address subscribed"
  }
  assert {
    condition     = alltrue([for key, a in aws_cloudwatch_metric_alarm.this : length(a.alarm_actions) == 1 && length(a.ok_actions) == 1])
    error_message = "every alarm notifies the topic"
  }
  assert {
    condition     = aws_cloudwatch_metric_alarm.this["errors"].namespace == "Custom/NTH" && aws_cloudwatch_metric_alarm.this["drains-incomplete"].namespace == "Custom/NTH"
    error_message = "alarms on nth's metrics follow metrics_namespace"
  }
}

run "alarms_to_an_existing_topic" {
  command = plan

  variables {
    alarm_topic_arn = "arn:aws:sns:us-east-1:123456789012:oncall"
  }

  assert {
    condition = length(aws_sns_topic.alarms) == 0 && alltrue([
      for key, a in aws_cloudwatch_metric_alarm.this :
      a.alarm_actions == toset(["arn:aws:sns:us-east-1:123456789012:oncall"]) && a.ok_actions == toset(["arn:aws:sns:us-east-1:123456789012:oncall"])
    ])
    error_message = "alarms notify the given topic, and none is created"
  }
}

run "no_dashboard_or_alarms" {
  command = plan

  variables {
    create_dashboard_and_alarms = false
    alarm_email                 = "oncall@example.com"
  }

  assert {
    condition     = length(aws_cloudwatch_metric_alarm.this) == 0 && length(aws_cloudwatch_dashboard.this) == 0 && length(aws_sns_topic.alarms) == 0
    error_message = "create_dashboard_and_alarms = false creates none of them"
  }
}

run "one_alarm_topic" {
  command = plan

  variables {
    alarm_topic_arn = "arn:aws:sns:us-east-1:123456789012:oncall"
    alarm_email     = "oncall@example.com"
  }

  expect_failures = [aws_lambda_function.this]
}

run "subnets_need_security_groups" {
  command = plan

  variables {
    subnet_ids = ["subnet-1"]
  }

  expect_failures = [aws_lambda_function.this]
}

run "lifecycle_condition_follows_the_managed_tag" {
  command = plan

  variables {
    managed_tag = "team-a/nth"
  }

  assert {
    condition = [
      for c in data.aws_iam_policy_document.function.statement[1].condition :
      [c.test, c.variable, toset(c.values)]
    ] == [["StringLike", "autoscaling:ResourceTag/team-a/nth", toset(["*"])]]
    error_message = "the condition names managed_tag"
  }
}

# Without the managed-tag check nth serves every instance of the cluster: a condition on the
# group's tag would deny lifecycle actions it must complete.
run "no_lifecycle_condition_without_the_managed_tag_check" {
  command = plan

  variables {
    check_managed_tag = false
  }

  assert {
    condition     = length(data.aws_iam_policy_document.function.statement[1].condition) == 0
    error_message = "no tag condition when check_managed_tag is false"
  }
}

run "no_lifecycle_condition_when_turned_off" {
  command = plan

  variables {
    lifecycle_managed_groups_only = false
  }

  assert {
    condition     = length(data.aws_iam_policy_document.function.statement[1].condition) == 0
    error_message = "lifecycle_managed_groups_only = false lifts the condition"
  }
}

run "managed_tag_is_one_key" {
  command = plan

  variables {
    managed_tag = "a,b"
  }

  expect_failures = [var.managed_tag]
}

# The template's AllowedPattern and AllowedValues, here as validations.
run "webhook_secret_is_one_secret" {
  command = plan

  variables {
    webhook_url_secret_arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:*"
  }

  expect_failures = [var.webhook_url_secret_arn]
}

run "webhook_secret_is_an_arn" {
  command = plan

  variables {
    webhook_url_secret_arn = "nth-webhook"
  }

  expect_failures = [var.webhook_url_secret_arn]
}

run "log_retention_is_a_cloudwatch_value" {
  command = plan

  variables {
    log_retention_in_days = 0
  }

  expect_failures = [var.log_retention_in_days]
}

run "taint_effect_is_checked" {
  command = plan

  variables {
    taint_effect = "Sometimes"
  }

  expect_failures = [var.taint_effect]
}

# Several clusters, from the instances' tags, with endpoints and CAs from eks:DescribeCluster.
run "clusters_listed" {
  command = plan

  variables {
    cluster_name     = ""
    cluster_endpoint = ""
    cluster_ca_data  = ""
    clusters         = ["blue", "green-1"]
  }

  assert {
    condition = (
      aws_lambda_function.this.environment[0].variables["CLUSTERS"] == "blue,green-1" &&
      length(setintersection(keys(aws_lambda_function.this.environment[0].variables), ["CLUSTER_NAME", "CLUSTER_ENDPOINT", "CLUSTER_CA_DATA"])) == 0
    )
    error_message = "CLUSTERS joins the names; CLUSTER_NAME, CLUSTER_ENDPOINT and CLUSTER_CA_DATA are left out"
  }
  assert {
    condition = one([for s in data.aws_iam_policy_document.function.statement : s if s.sid == "DescribeCluster"]).resources == toset([
      "arn:aws:eks:us-east-1:123456789012:cluster/blue",
      "arn:aws:eks:us-east-1:123456789012:cluster/green-1",
    ])
    error_message = "eks:DescribeCluster on exactly the listed clusters"
  }
  assert {
    condition     = one([for s in data.aws_iam_policy_document.function.statement : s if s.sid == "DescribeCluster"]).actions == toset(["eks:DescribeCluster"])
    error_message = "the DescribeCluster statement grants only eks:DescribeCluster"
  }
  assert {
    condition = (
      length(aws_eks_access_entry.function) == 0 &&
      toset(keys(aws_eks_access_entry.clusters)) == toset(["blue", "green-1"]) &&
      aws_eks_access_entry.clusters["green-1"].cluster_name == "green-1" &&
      alltrue([for k, e in aws_eks_access_entry.clusters : e.kubernetes_groups == toset(["nth-node-termination-handler"]) && e.type == "STANDARD"])
    )
    error_message = "one access entry per listed cluster, each mapping the role to the group deploy/rbac.yaml binds"
  }
}

run "every_cluster" {
  command = plan

  variables {
    cluster_name     = ""
    cluster_endpoint = ""
    cluster_ca_data  = ""
    clusters         = ["*"]
  }

  assert {
    condition     = aws_lambda_function.this.environment[0].variables["CLUSTERS"] == "*"
    error_message = "CLUSTERS is *"
  }
  assert {
    condition     = one([for s in data.aws_iam_policy_document.function.statement : s if s.sid == "DescribeCluster"]).resources == toset(["arn:aws:eks:us-east-1:123456789012:cluster/*"])
    error_message = "eks:DescribeCluster on every cluster of this account and region"
  }
  assert {
    condition     = length(aws_eks_access_entry.function) == 0 && length(aws_eks_access_entry.clusters) == 0
    error_message = "* names no cluster to create an access entry in"
  }
}

run "one_cluster_described" {
  command = plan

  variables {
    cluster_endpoint    = ""
    cluster_ca_data     = ""
    create_access_entry = false
  }

  assert {
    condition = (
      aws_lambda_function.this.environment[0].variables["CLUSTER_NAME"] == "prod" &&
      length(setintersection(keys(aws_lambda_function.this.environment[0].variables), ["CLUSTERS", "CLUSTER_ENDPOINT", "CLUSTER_CA_DATA"])) == 0
    )
    error_message = "CLUSTER_NAME alone: the endpoint and CA come from eks:DescribeCluster"
  }
  assert {
    condition     = one([for s in data.aws_iam_policy_document.function.statement : s if s.sid == "DescribeCluster"]).resources == toset(["arn:aws:eks:us-east-1:123456789012:cluster/prod"])
    error_message = "eks:DescribeCluster on cluster_name only"
  }
  assert {
    condition     = length(aws_eks_access_entry.function) == 0 && length(aws_eks_access_entry.clusters) == 0
    error_message = "no access entry when create_access_entry is false"
  }
}

run "cluster_name_or_clusters_not_both" {
  command = plan

  variables {
    cluster_endpoint = ""
    cluster_ca_data  = ""
    clusters         = ["blue"]
  }

  expect_failures = [aws_lambda_function.this]
}

run "cluster_name_or_clusters_not_neither" {
  command = plan

  variables {
    cluster_name     = ""
    cluster_endpoint = ""
    cluster_ca_data  = ""
  }

  expect_failures = [aws_lambda_function.this]
}

run "endpoint_only_with_cluster_name" {
  command = plan

  variables {
    cluster_name = ""
    clusters     = ["blue"]
  }

  expect_failures = [aws_lambda_function.this]
}

run "endpoint_and_ca_together" {
  command = plan

  variables {
    cluster_ca_data = ""
  }

  expect_failures = [aws_lambda_function.this]
}

run "every_cluster_stands_alone" {
  command = plan

  variables {
    cluster_name     = ""
    cluster_endpoint = ""
    cluster_ca_data  = ""
    clusters         = ["*", "blue"]
  }

  expect_failures = [var.clusters]
}

run "cluster_names_are_checked" {
  command = plan

  variables {
    cluster_name     = ""
    cluster_endpoint = ""
    cluster_ca_data  = ""
    clusters         = ["blue", "../x"]
  }

  expect_failures = [var.clusters]
}

# Long drains: the function continues one by invoking itself asynchronously.
run "long_drains_continue_in_the_function_itself" {
  command = plan

  variables {
    max_drain_seconds = 7200
  }

  override_resource {
    target          = aws_lambda_function.this
    override_during = plan
    values = {
      arn = "arn:aws:lambda:us-east-1:123456789012:function:nth"
    }
  }

  assert {
    condition     = aws_lambda_function.this.environment[0].variables["MAX_DRAIN_SECONDS"] == "7200"
    error_message = "MAX_DRAIN_SECONDS follows max_drain_seconds"
  }
  assert {
    condition = (
      data.aws_iam_policy_document.continue_drain.statement[0].actions == toset(["lambda:InvokeFunction"]) &&
      data.aws_iam_policy_document.continue_drain.statement[0].resources == toset([
        "arn:aws:lambda:us-east-1:123456789012:function:nth",
        "arn:aws:lambda:us-east-1:123456789012:function:nth:*",
      ])
    )
    error_message = "the role may invoke the function itself, and nothing else"
  }
}

run "max_drain_seconds_is_checked" {
  command = plan

  variables {
    max_drain_seconds = 172801
  }

  expect_failures = [var.max_drain_seconds]
}
