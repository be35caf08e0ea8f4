# One EventBridge rule per kind of event, each with its own switch. Every target is the
# function, invoked asynchronously, so the event invoke config's retries and destination apply.
# Every pattern pins the account: events about this account's instances and groups only.

locals {
  # Lifecycle rules match only the named groups, when there are any. (A for expression, not
  # a conditional: older Terraform will not unify an object with an empty one.)
  group_filter = {
    for key, value in { detail = { AutoScalingGroupName = var.auto_scaling_group_names } } :
    key => value if length(var.auto_scaling_group_names) > 0
  }

  rules = {
    spot-interruption = {
      enabled     = var.enable_spot_interruption
      detail_type = "EC2 Spot Instance Interruption Warning"
      pattern = jsonencode({
        source        = ["aws.ec2"]
        account       = [local.account_id]
        "detail-type" = ["EC2 Spot Instance Interruption Warning"]
      })
    }
    rebalance-recommendation = {
      enabled     = var.enable_rebalance_recommendation
      detail_type = "EC2 Instance Rebalance Recommendation"
      pattern = jsonencode({
        source        = ["aws.ec2"]
        account       = [local.account_id]
        "detail-type" = ["EC2 Instance Rebalance Recommendation"]
      })
    }
    instance-state-change = {
      enabled     = var.enable_instance_state_change
      detail_type = "EC2 Instance State-change Notification"
      pattern = jsonencode({
        source        = ["aws.ec2"]
        account       = [local.account_id]
        "detail-type" = ["EC2 Instance State-change Notification"]
        detail = {
          state = ["stopping", "stopped", "shutting-down", "terminated", "running"]
        }
      })
    }
    capacity-reservation-interruption = {
      enabled     = var.enable_capacity_reservation_interruption
      detail_type = "EC2 Capacity Reservation Instance Interruption Warning"
      pattern = jsonencode({
        source        = ["aws.ec2"]
        account       = [local.account_id]
        "detail-type" = ["EC2 Capacity Reservation Instance Interruption Warning"]
      })
    }
    terminate-lifecycle-action = {
      enabled     = var.enable_terminate_lifecycle_action
      detail_type = "EC2 Instance-terminate Lifecycle Action"
      pattern = jsonencode(merge({
        source        = ["aws.autoscaling"]
        account       = [local.account_id]
        "detail-type" = ["EC2 Instance-terminate Lifecycle Action"]
      }, local.group_filter))
    }
    launch-lifecycle-action = {
      enabled     = var.enable_launch_lifecycle_action
      detail_type = "EC2 Instance-launch Lifecycle Action"
      pattern = jsonencode(merge({
        source        = ["aws.autoscaling"]
        account       = [local.account_id]
        "detail-type" = ["EC2 Instance-launch Lifecycle Action"]
      }, local.group_filter))
    }
    scheduled-change = {
      enabled     = var.enable_scheduled_change
      detail_type = "AWS Health Event"
      pattern = jsonencode({
        source        = ["aws.health"]
        account       = [local.account_id]
        "detail-type" = ["AWS Health Event"]
        detail = {
          service           = ["EC2"]
          eventTypeCategory = ["scheduledChange"]
          # upcoming and open drain (older events carry no statusCode); closed only gives a
          # reboot maintenance's nodes back, so any other closed event would be an
          # invocation for nothing (nth skips it).
          "$or" = [
            { statusCode = ["upcoming", "open"] },
            { statusCode = [{ exists = false }] },
            {
              statusCode    = ["closed"]
              eventTypeCode = ["AWS_EC2_SYSTEM_REBOOT_MAINTENANCE_SCHEDULED", "AWS_EC2_INSTANCE_REBOOT_MAINTENANCE_SCHEDULED"]
            },
          ]
        }
      })
    }
  }

  enabled_rules = { for kind, rule in local.rules : kind => rule if rule.enabled }
}

resource "aws_cloudwatch_event_rule" "this" {
  for_each      = local.enabled_rules
  name          = "${var.name}-${each.key}"
  description   = "nth - ${each.value.detail_type}"
  event_pattern = each.value.pattern
  tags          = var.tags
}

resource "aws_cloudwatch_event_target" "this" {
  for_each  = local.enabled_rules
  rule      = aws_cloudwatch_event_rule.this[each.key].name
  target_id = "nth"
  arn       = aws_lambda_function.this.arn
}

resource "aws_lambda_permission" "events" {
  for_each      = local.enabled_rules
  statement_id  = "events-${each.key}"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.this.function_name
  principal     = "events.amazonaws.com"
  source_arn    = aws_cloudwatch_event_rule.this[each.key].arn
}
