output "function_arn" {
  description = "The nth function."
  value       = aws_lambda_function.this.arn
}

output "role_arn" {
  description = "The function's role; the access entry maps it to the Kubernetes group nth-node-termination-handler."
  value       = aws_iam_role.function.arn
}

output "dead_letter_queue_url" {
  description = "Where failed events are kept (on-failure destination)."
  value       = aws_sqs_queue.dead_letter.url
}

output "dashboard_url" {
  description = "The CloudWatch dashboard; null when create_dashboard_and_alarms is false."
  value       = one([for d in aws_cloudwatch_dashboard.this : "https://${local.region}.console.aws.amazon.com/cloudwatch/home?region=${local.region}#dashboards:name=${d.dashboard_name}"])
}

output "alarm_topic_arn" {
  description = "The SNS topic created for the alarms (alarm_email is subscribed to it); null when none was created."
  value       = one(aws_sns_topic.alarms[*].arn)
}
