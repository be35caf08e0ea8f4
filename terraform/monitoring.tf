# Dashboard and alarms (create_dashboard_and_alarms). The function's metrics come from its log
# in embedded metric format, under metrics_namespace, with the dimension sets [Kind] and []
# (no dimension): the dimensionless series are the totals. template.yaml creates the same.

locals {
  monitoring = var.create_dashboard_and_alarms
  # The existing topic, or the one created for alarm_email, or none.
  alarm_actions = var.alarm_topic_arn != "" ? [var.alarm_topic_arn] : aws_sns_topic.alarms[*].arn

  alarms = {
    "dead-letter-queue" = {
      description = "nth: a failed event is waiting in the dead-letter queue. Lambda failed it three times (or it waited six hours), so its node may not have been cordoned or drained. Read the message (requestPayload is the event, responsePayload the error), fix the cause, replay it with nth-lambda replay, then delete it. See README.md, Dashboard and alarms, and Troubleshooting."
      namespace   = "AWS/SQS"
      metric_name = "ApproximateNumberOfMessagesVisible"
      statistic   = "Maximum"
      dimensions  = { QueueName = aws_sqs_queue.dead_letter.name }
    }
    "errors" = {
      description = "nth: an interruption failed (nth's Errors metric). The function's log has the error with the event id, instance and node, and the metric line's ErrorStages says where it failed: parse, resolve, node, drain or lifecycle. Check the node with kubectl describe node. See README.md, Dashboard and alarms, and Troubleshooting."
      namespace   = var.metrics_namespace
      metric_name = "Errors"
      statistic   = "Sum"
      dimensions  = {}
    }
    "function-errors" = {
      description = "nth: the function itself failed an invocation (AWS/Lambda Errors: a crash, a timeout or a configuration error such as a missing CLUSTER_NAME). Lambda retries it twice, then keeps the event in the dead-letter queue. Read the function's log for the request. See README.md, Dashboard and alarms, and Troubleshooting."
      namespace   = "AWS/Lambda"
      metric_name = "Errors"
      statistic   = "Sum"
      dimensions  = { FunctionName = aws_lambda_function.this.function_name }
    }
    "drains-incomplete" = {
      description = "nth: a drain ended with pods left on the node (DrainsIncomplete), usually a PodDisruptionBudget that allowed no eviction before the deadline. The DrainIncomplete event on the node and the drain report in the log name the pods and why. See README.md, Dashboard and alarms, and Troubleshooting."
      namespace   = var.metrics_namespace
      metric_name = "DrainsIncomplete"
      statistic   = "Sum"
      dimensions  = {}
    }
  }

  dashboard_widgets = [
    { type = "text", x = 0, y = 0, width = 12, height = 6, properties = {
      markdown = "## nth: node termination handler\nInterruptions the function handled and what its drains did. Metrics in namespace **${var.metrics_namespace}**, 5-minute sums unless noted. When an alarm fires, see the README section *Dashboard and alarms*."
    } },
    { type = "alarm", x = 12, y = 0, width = 12, height = 6, properties = {
      title  = "Alarms"
      alarms = [for alarm in aws_cloudwatch_metric_alarm.this : alarm.arn]
    } },
    { type = "metric", x = 0, y = 6, width = 12, height = 6, properties = {
      title = "Interruptions and drains", view = "timeSeries", region = local.region, period = 300, stat = "Sum"
      metrics = [
        [var.metrics_namespace, "Interruptions", { stat = "Sum", label = "Interruptions" }],
        [var.metrics_namespace, "NodesCordoned", { stat = "Sum", label = "Nodes cordoned" }],
        [var.metrics_namespace, "NodesDrained", { stat = "Sum", label = "Nodes drained" }],
        [var.metrics_namespace, "DrainsIncomplete", { stat = "Sum", label = "Drains incomplete" }],
      ]
    } },
    { type = "metric", x = 12, y = 6, width = 12, height = 6, properties = {
      title = "Interruptions by kind", view = "timeSeries", region = local.region, period = 300, stat = "Sum"
      metrics = [
        [{ expression = "SEARCH('{\"${var.metrics_namespace}\",Kind} MetricName=\"Interruptions\"', 'Sum', 300)", id = "kinds", label = "" }],
      ]
    } },
    { type = "metric", x = 0, y = 12, width = 12, height = 6, properties = {
      title = "Drain duration (ms)", view = "timeSeries", region = local.region, period = 300, stat = "p50"
      metrics = [
        [var.metrics_namespace, "DrainDuration", { stat = "p50", label = "p50" }],
        [var.metrics_namespace, "DrainDuration", { stat = "p90", label = "p90" }],
        [var.metrics_namespace, "DrainDuration", { stat = "Maximum", label = "max" }],
      ]
    } },
    { type = "metric", x = 12, y = 12, width = 12, height = 6, properties = {
      title = "Pods evicted and left behind", view = "timeSeries", region = local.region, period = 300, stat = "Sum"
      metrics = [
        [var.metrics_namespace, "PodsEvicted", { stat = "Sum", label = "Pods evicted" }],
        [var.metrics_namespace, "PodsLeft", { stat = "Sum", label = "Pods left" }],
      ]
    } },
    { type = "metric", x = 0, y = 18, width = 12, height = 6, properties = {
      title = "Errors", view = "timeSeries", region = local.region, period = 300, stat = "Sum"
      metrics = [
        [var.metrics_namespace, "Errors", { stat = "Sum", label = "Failed interruptions (nth Errors)" }],
        ["AWS/Lambda", "Errors", "FunctionName", aws_lambda_function.this.function_name, { stat = "Sum", label = "Failed invocations (Lambda Errors)" }],
        ["AWS/Lambda", "Throttles", "FunctionName", aws_lambda_function.this.function_name, { stat = "Sum", label = "Throttled invocations" }],
      ]
    } },
    { type = "metric", x = 12, y = 18, width = 12, height = 6, properties = {
      title = "Dead-letter queue: failed events waiting", view = "timeSeries", region = local.region, period = 300, stat = "Maximum"
      metrics = [
        ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", aws_sqs_queue.dead_letter.name, { stat = "Maximum", label = "Messages" }],
      ]
    } },
  ]
}

resource "aws_sns_topic" "alarms" {
  #checkov:skip=CKV_AWS_26:The topic carries alarm names and states only; CloudWatch alarms cannot publish to a topic encrypted with the AWS managed SNS key, and a customer key is left to the operator (alarm_topic_arn).
  count        = local.monitoring && var.alarm_topic_arn == "" && var.alarm_email != "" ? 1 : 0
  name         = "${var.name}-alarms"
  display_name = "nth alarms"
  tags         = var.tags
}

resource "aws_sns_topic_subscription" "alarm_email" {
  count     = length(aws_sns_topic.alarms)
  topic_arn = aws_sns_topic.alarms[0].arn
  protocol  = "email"
  endpoint  = var.alarm_email
}

resource "aws_cloudwatch_metric_alarm" "this" {
  for_each            = local.monitoring ? local.alarms : {}
  alarm_name          = "${var.name}-${each.key}"
  alarm_description   = each.value.description
  namespace           = each.value.namespace
  metric_name         = each.value.metric_name
  dimensions          = each.value.dimensions
  statistic           = each.value.statistic
  period              = 300
  evaluation_periods  = 1
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = var.tags
}

resource "aws_cloudwatch_dashboard" "this" {
  count          = local.monitoring ? 1 : 0
  dashboard_name = var.name
  dashboard_body = jsonencode({ widgets = local.dashboard_widgets })
}
