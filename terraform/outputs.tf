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
