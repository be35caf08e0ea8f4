variable "region" {
  description = "The cluster's region."
  type        = string
}

variable "cluster_name" {
  description = "The EKS cluster to protect."
  type        = string
}

variable "architecture" {
  description = "arm64 (the default) or x86_64: must match the zip scripts/package built."
  type        = string
  default     = "arm64"
}

variable "dry_run" {
  description = "Log writes instead of making them."
  type        = bool
  default     = true
}

variable "alarm_email" {
  description = "An email address for the alarms (it must confirm the SNS subscription); empty: alarms without notifications."
  type        = string
  default     = ""
}
