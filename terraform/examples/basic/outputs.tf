output "function_arn" {
  value = module.nth.function_arn
}

output "role_arn" {
  value = module.nth.role_arn
}

output "dead_letter_queue_url" {
  value = module.nth.dead_letter_queue_url
}

output "dashboard_url" {
  value = module.nth.dashboard_url
}
