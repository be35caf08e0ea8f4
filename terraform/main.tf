# nth: EventBridge rules invoke a Rust Lambda function that cordons, taints and drains the
# Kubernetes node of an EC2 instance that is about to go. The same resources as
# template.yaml; scripts/check-deploy keeps the two in step.

data "aws_partition" "current" {}
data "aws_caller_identity" "current" {}
data "aws_region" "current" {}

locals {
  zip_path = coalesce(var.lambda_zip_path, "${path.module}/../target/lambda/nth-lambda/bootstrap.zip")

  partition  = data.aws_partition.current.partition
  account_id = data.aws_caller_identity.current.account_id
  # `name` is deprecated in provider 6 (in favour of `region`) but present in 5 and 6.
  region = data.aws_region.current.name

  # The Kubernetes group deploy/rbac.yaml binds.
  kubernetes_group = "nth-node-termination-handler"

  use_vpc = length(var.subnet_ids) > 0

  # The clusters served: cluster_name, or clusters (names, or "*" for every cluster).
  served_clusters = length(var.clusters) > 0 ? var.clusters : [var.cluster_name]
  describe_cluster_arns = [
    for name in local.served_clusters : "arn:${local.partition}:eks:${local.region}:${local.account_id}:cluster/${name}"
  ]
  # An access entry in each named cluster of clusters; "*" names none.
  listed_access_entry_clusters = var.create_access_entry ? toset([for name in var.clusters : name if name != "*"]) : toset([])

  # The lifecycle permissions hold only in groups carrying managed_tag (see the policy).
  lifecycle_managed_groups_only = var.check_managed_tag && var.lifecycle_managed_groups_only

  group_arn_prefix = "arn:${local.partition}:autoscaling:${local.region}:${local.account_id}:autoScalingGroup:*:autoScalingGroupName/"
  lifecycle_group_arns = (
    length(var.auto_scaling_group_names) > 0
    ? [for name in var.auto_scaling_group_names : "${local.group_arn_prefix}${name}"]
    : ["${local.group_arn_prefix}*"]
  )

  # Always set: the function's documented defaults are the variables' defaults.
  required_environment = {
    TAINT_PREFIX                = var.taint_prefix
    TAINT_EFFECT                = var.taint_effect
    DRY_RUN                     = tostring(var.dry_run)
    REBALANCE_DRAIN             = tostring(var.rebalance_drain)
    MANAGED_TAG                 = var.managed_tag
    CHECK_MANAGED_TAG           = tostring(var.check_managed_tag)
    LEAVE_KARPENTER_NODES       = tostring(var.leave_karpenter_nodes)
    DRAIN_CONCURRENCY           = tostring(var.drain_concurrency)
    EVICTION_RETRY_SECONDS      = tostring(var.eviction_retry_seconds)
    DRAIN_EMPTYDIR_PODS         = tostring(var.drain_empty_dir_pods)
    DRAIN_UNMANAGED_PODS        = tostring(var.drain_unmanaged_pods)
    EXCLUDE_FROM_LOAD_BALANCERS = tostring(var.exclude_from_load_balancers)
    OUT_OF_SERVICE_TAINT        = tostring(var.out_of_service_taint)
    MAX_DRAIN_SECONDS           = tostring(var.max_drain_seconds)
    LOG_LEVEL                   = var.log_level
    METRICS_NAMESPACE           = var.metrics_namespace
    WEBHOOK_FORMAT              = var.webhook_format
  }
  # Left out when empty or null: the function then uses its own default.
  optional_environment = {
    CLUSTER_NAME                       = var.cluster_name
    CLUSTERS                           = join(",", var.clusters)
    CLUSTER_ENDPOINT                   = var.cluster_endpoint
    CLUSTER_CA_DATA                    = var.cluster_ca_data
    ACTIONS                            = var.actions
    POD_TERMINATION_GRACE_PERIOD       = var.pod_termination_grace_period == null ? "" : tostring(var.pod_termination_grace_period)
    LIFECYCLE_HEARTBEAT_SECONDS        = var.lifecycle_heartbeat_seconds == null ? "" : tostring(var.lifecycle_heartbeat_seconds)
    LIFECYCLE_COMPLETION_DELAY_SECONDS = tostring(var.lifecycle_completion_delay_seconds)
    EXCLUDE_NAMESPACES                 = join(",", var.exclude_namespaces)
    EXCLUDE_POD_LABELS                 = join(",", var.exclude_pod_labels)
    WEBHOOK_URL_SECRET_ARN             = var.webhook_url_secret_arn
    WEBHOOK_TEMPLATE                   = var.webhook_template
    WEBHOOK_ALLOW_HTTP                 = var.webhook_allow_http ? "true" : ""
  }
  environment = merge(
    local.required_environment,
    { for k, v in local.optional_environment : k => v if v != "" },
  )
}

# A failed event (after Lambda's own retries, or too old to run) lands here with the error,
# so nothing is lost. Replay it with `nth-lambda replay`.
resource "aws_sqs_queue" "dead_letter" {
  #checkov:skip=CKV_AWS_27:The queue is encrypted at rest with SQS-managed keys (sqs_managed_sse_enabled); a KMS key would need kms grants for Lambda's destination delivery.
  name                      = "${var.name}-dead-letter"
  sqs_managed_sse_enabled   = true
  message_retention_seconds = 1209600
  tags                      = var.tags
}

resource "aws_iam_role" "function" {
  name        = "${var.name}-function"
  description = "nth node termination handler function"
  tags        = var.tags
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "lambda.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
}

# No managed policies: AWSLambdaBasicExecutionRole and AWSLambdaVPCAccessExecutionRole allow
# logs actions on every log group. The Logs and Vpc statements below grant the same, the logs
# on the function's own log group only.

data "aws_iam_policy_document" "function" {
  # None of these actions supports resource-level permissions. DescribeLifecycleHooks
  # reads the hook's timeouts, which cap a drain; DescribeAutoScalingInstances checks a
  # termination event against its group.
  statement {
    sid       = "Describe"
    actions   = ["ec2:DescribeInstances", "autoscaling:DescribeTags", "autoscaling:DescribeLifecycleHooks", "autoscaling:DescribeAutoScalingInstances"]
    resources = ["*"]
  }

  statement {
    sid       = "LifecycleActions"
    actions   = ["autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat"]
    resources = local.lifecycle_group_arns

    # Defence in depth (lifecycle_managed_groups_only, with check_managed_tag): only in groups
    # that carry managed_tag, whatever its value, so that not even a bug can release another
    # team's hook. Both actions take the autoScalingGroup resource, whose condition keys
    # include autoscaling:ResourceTag/<key> (IAM service authorization reference).
    dynamic "condition" {
      for_each = local.lifecycle_managed_groups_only ? [var.managed_tag] : []
      content {
        test     = "StringLike"
        variable = "autoscaling:ResourceTag/${condition.value}"
        values   = ["*"]
      }
    }
  }

  # Lambda writes the function's log with its role: to its own log group only.
  statement {
    sid       = "Logs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.function.arn}:*"]
  }

  # In a VPC (subnet_ids), Lambda manages the function's network interfaces with its role:
  # AWSLambdaVPCAccessExecutionRole's EC2 actions, without its logs. None of them is limited
  # to a subnet or interface by Lambda's use of them.
  dynamic "statement" {
    for_each = local.use_vpc ? [1] : []
    content {
      sid = "Vpc"
      actions = [
        "ec2:CreateNetworkInterface",
        "ec2:DescribeNetworkInterfaces",
        "ec2:DescribeSubnets",
        "ec2:DeleteNetworkInterface",
        "ec2:AssignPrivateIpAddresses",
        "ec2:UnassignPrivateIpAddresses",
      ]
      resources = ["*"]
    }
  }

  # Lambda sends the on-failure record with the function's role.
  statement {
    sid       = "DeadLetterQueue"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.dead_letter.arn]
  }

  dynamic "statement" {
    for_each = var.webhook_url_secret_arn == "" ? [] : [var.webhook_url_secret_arn]
    content {
      sid       = "WebhookUrlSecret"
      actions   = ["secretsmanager:GetSecretValue"]
      resources = [statement.value]
    }
  }

  # The endpoint and CA of each cluster served, unless cluster_endpoint gives them.
  dynamic "statement" {
    for_each = var.cluster_endpoint == "" ? [local.describe_cluster_arns] : []
    content {
      sid       = "DescribeCluster"
      actions   = ["eks:DescribeCluster"]
      resources = statement.value
    }
  }
}

resource "aws_iam_role_policy" "function" {
  name   = "nth"
  role   = aws_iam_role.function.id
  policy = data.aws_iam_policy_document.function.json
}

# A drain cut short by the timeout goes on in an asynchronous invocation of the function
# itself (max_drain_seconds). A policy of its own, after the function: the function depends
# on the role, and this names the function's ARN.
data "aws_iam_policy_document" "continue_drain" {
  statement {
    sid       = "ContinueDrain"
    actions   = ["lambda:InvokeFunction"]
    resources = [aws_lambda_function.this.arn, "${aws_lambda_function.this.arn}:*"]
  }
}

resource "aws_iam_role_policy" "continue_drain" {
  name   = "nth-continue-drain"
  role   = aws_iam_role.function.id
  policy = data.aws_iam_policy_document.continue_drain.json
}

resource "aws_cloudwatch_log_group" "function" {
  #checkov:skip=CKV_AWS_158:The log holds node, pod and instance names, no secrets; CloudWatch Logs encrypts it at rest with its own key, and a customer KMS key is left to the operator.
  #checkov:skip=CKV_AWS_338:Retention is the operator's choice (log_retention_in_days, default 30 days): the log is for operating the handler, not an audit trail.
  name              = "/aws/lambda/${var.name}"
  retention_in_days = var.log_retention_in_days
  tags              = var.tags
}

resource "aws_lambda_function" "this" {
  #checkov:skip=CKV_AWS_50:The function sends no traces (no X-Ray SDK); tracing would only add the daemon's permissions.
  #checkov:skip=CKV_AWS_115:Reserved concurrency is optional (reserved_concurrent_executions): one event invokes one function, and reserving capacity is the operator's choice.
  #checkov:skip=CKV_AWS_116:Failed events go to the SQS on-failure destination of aws_lambda_function_event_invoke_config (with the error and the request), which supersedes a dead-letter queue.
  #checkov:skip=CKV_AWS_117:A VPC is optional: subnet_ids and security_group_ids put the function in a private cluster's VPC; a public cluster needs none.
  #checkov:skip=CKV_AWS_173:The environment holds no secrets (the cluster CA is public; the webhook URL stays in Secrets Manager); Lambda encrypts it at rest with its own key.
  #checkov:skip=CKV_AWS_272:The zip is built from this repository by cargo lambda and deployed by the operator; code signing needs a signing profile the module cannot assume.
  function_name    = var.name
  description      = "nth node termination handler"
  role             = aws_iam_role.function.arn
  runtime          = "provided.al2023"
  handler          = "bootstrap"
  architectures    = [var.architecture]
  filename         = local.zip_path
  source_code_hash = filebase64sha256(local.zip_path)
  memory_size      = var.memory_size
  timeout          = var.timeout
  # -1: no reserved concurrency.
  reserved_concurrent_executions = var.reserved_concurrent_executions == null ? -1 : var.reserved_concurrent_executions
  tags                           = var.tags

  logging_config {
    log_format = "JSON"
    log_group  = aws_cloudwatch_log_group.function.name
  }

  dynamic "vpc_config" {
    for_each = local.use_vpc ? [1] : []
    content {
      subnet_ids         = var.subnet_ids
      security_group_ids = var.security_group_ids
    }
  }

  environment {
    variables = local.environment
  }

  lifecycle {
    precondition {
      condition     = (var.cluster_name == "") != (length(var.clusters) == 0)
      error_message = "Give cluster_name (one cluster) or clusters (several, or [\"*\"]), not both."
    }
    precondition {
      condition     = var.cluster_endpoint == "" || var.cluster_name != ""
      error_message = "cluster_endpoint goes with cluster_name; with clusters, each cluster's endpoint comes from eks:DescribeCluster."
    }
    precondition {
      condition     = (var.cluster_endpoint == "") == (var.cluster_ca_data == "")
      error_message = "Give cluster_endpoint and cluster_ca_data together, or neither (the function then reads them with eks:DescribeCluster)."
    }
    precondition {
      condition     = !local.use_vpc || length(var.security_group_ids) > 0
      error_message = "security_group_ids is required when subnet_ids is set."
    }
    precondition {
      condition     = var.alarm_topic_arn == "" || var.alarm_email == ""
      error_message = "Give alarm_topic_arn or alarm_email, not both (subscribe the address to your topic yourself)."
    }
  }

  # Its logs and network interface permissions first.
  depends_on = [aws_iam_role_policy.function]
}

# Also for the function's own continuations (max_drain_seconds): each is a new asynchronous
# event, so its age counts from when the function sent it.
resource "aws_lambda_function_event_invoke_config" "this" {
  function_name                = aws_lambda_function.this.function_name
  qualifier                    = "$LATEST"
  maximum_retry_attempts       = 2
  maximum_event_age_in_seconds = 21600

  destination_config {
    on_failure {
      destination = aws_sqs_queue.dead_letter.arn
    }
  }

  # The role must be allowed to send before Lambda accepts the destination.
  depends_on = [aws_iam_role_policy.function]
}

resource "aws_eks_access_entry" "function" {
  count             = var.create_access_entry && var.cluster_name != "" ? 1 : 0
  cluster_name      = var.cluster_name
  principal_arn     = aws_iam_role.function.arn
  type              = "STANDARD"
  kubernetes_groups = [local.kubernetes_group]
  tags              = var.tags
}

# The same in each cluster named in clusters.
resource "aws_eks_access_entry" "clusters" {
  for_each          = local.listed_access_entry_clusters
  cluster_name      = each.key
  principal_arn     = aws_iam_role.function.arn
  type              = "STANDARD"
  kubernetes_groups = [local.kubernetes_group]
  tags              = var.tags
}
