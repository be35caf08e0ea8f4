# The same settings as template.yaml's parameters, in snake_case (scripts/check-deploy checks
# that the two agree). Only name, tags and lambda_zip_path are Terraform's own.

variable "name" {
  description = "Name of the function, and prefix of the other resources' names."
  type        = string
  default     = "nth"
}

variable "tags" {
  description = "Tags for every resource that takes them."
  type        = map(string)
  default     = {}
}

variable "lambda_zip_path" {
  description = <<-EOT
    The function's zip, as `cargo lambda build --release --output-format zip` writes it
    (scripts/package). null means target/lambda/nth-lambda/bootstrap.zip at the root of this
    repository. Build it for the same architecture as var.architecture.
  EOT
  type        = string
  default     = null
}

# Cluster

# Give cluster_name or clusters (checked on aws_lambda_function.this: Terraform 1.5 cannot
# compare two variables in a validation).

variable "cluster_name" {
  description = "The EKS cluster whose nodes the function drains (CLUSTER_NAME). Give this or clusters."
  type        = string
  default     = ""

  validation {
    condition     = var.cluster_name == "" || can(regex("^[0-9A-Za-z][A-Za-z0-9_-]*$", var.cluster_name))
    error_message = "cluster_name must be empty or an EKS cluster name."
  }
}

variable "clusters" {
  description = "Several EKS clusters served by this one function, or [\"*\"] for every cluster of the account and region (CLUSTERS); an instance's cluster comes from its tags (eks:cluster-name, kubernetes.io/cluster/NAME) and each cluster's endpoint and CA from eks:DescribeCluster. Give this or cluster_name."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.clusters : c == "*" || can(regex("^[0-9A-Za-z][A-Za-z0-9_-]*$", c))])
    error_message = "clusters must hold EKS cluster names, or be [\"*\"]."
  }
  validation {
    condition     = !contains(var.clusters, "*") || length(var.clusters) == 1
    error_message = "clusters is either cluster names or [\"*\"] (every cluster), not both."
  }
}

variable "cluster_endpoint" {
  description = "Optional, with cluster_name only: the API server URL, aws_eks_cluster's endpoint (CLUSTER_ENDPOINT). Empty: the function reads it with eks:DescribeCluster once per container."
  type        = string
  default     = ""

  validation {
    condition     = var.cluster_endpoint == "" || startswith(var.cluster_endpoint, "https://")
    error_message = "cluster_endpoint must be empty or the https:// URL of the API server."
  }
}

variable "cluster_ca_data" {
  description = "With cluster_endpoint: the cluster CA, base64 PEM, aws_eks_cluster's certificate_authority[0].data (CLUSTER_CA_DATA)."
  type        = string
  default     = ""
}

variable "create_access_entry" {
  description = "Create an EKS access entry mapping the function's role to the Kubernetes group nth-node-termination-handler in cluster_name, or in each cluster named in clusters (none for \"*\"), whose authentication mode must be API or API_AND_CONFIG_MAP. Bind the group with deploy/rbac.yaml in each cluster."
  type        = bool
  default     = true
}

# Function

variable "architecture" {
  description = "The function's instruction set; the zip must be built for the same one."
  type        = string
  default     = "arm64"

  validation {
    condition     = contains(["arm64", "x86_64"], var.architecture)
    error_message = "architecture must be arm64 or x86_64."
  }
}

variable "memory_size" {
  description = "Memory in MB."
  type        = number
  default     = 128

  validation {
    condition     = var.memory_size >= 128 && var.memory_size <= 256
    error_message = "memory_size must be between 128 and 256."
  }
}

variable "timeout" {
  description = "Seconds an invocation may run; a drain waits for PodDisruptionBudgets up to the instance's deadline or this timeout."
  type        = number
  default     = 900

  validation {
    condition     = var.timeout >= 30 && var.timeout <= 900
    error_message = "timeout must be between 30 and 900."
  }
}

variable "reserved_concurrent_executions" {
  description = "Reserved concurrency; null leaves it unset (the account's unreserved pool)."
  type        = number
  default     = null

  validation {
    condition     = var.reserved_concurrent_executions == null ? true : var.reserved_concurrent_executions >= 0 && floor(var.reserved_concurrent_executions) == var.reserved_concurrent_executions
    error_message = "reserved_concurrent_executions must be null or a whole number, 0 or more."
  }
}

variable "log_level" {
  description = "A tracing filter, e.g. debug or info,nth_core=debug (LOG_LEVEL)."
  type        = string
  default     = "info"
}

variable "log_retention_in_days" {
  description = "Days CloudWatch Logs keeps the function's log."
  type        = number
  default     = 30

  # CloudWatch's own values, as template.yaml's AllowedValues; 0 (never expire) is not one.
  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_in_days)
    error_message = "log_retention_in_days must be one of CloudWatch Logs' values: 1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288 or 3653."
  }
}

# Behaviour

variable "dry_run" {
  description = "Log every write (PATCH, eviction, delete, lifecycle completion) instead of making it (DRY_RUN)."
  type        = bool
  default     = false
}

variable "taint_prefix" {
  description = "Prefix of the taints and annotations nth writes (TAINT_PREFIX)."
  type        = string
  default     = "node-termination-handler"
}

variable "taint_effect" {
  description = "Effect of the taint (TAINT_EFFECT)."
  type        = string
  default     = "NoSchedule"

  validation {
    condition     = contains(["NoSchedule", "PreferNoSchedule", "NoExecute"], var.taint_effect)
    error_message = "taint_effect must be NoSchedule, PreferNoSchedule or NoExecute."
  }
}

variable "rebalance_drain" {
  description = "Drain on a rebalance recommendation, not only taint and cordon (REBALANCE_DRAIN)."
  type        = bool
  default     = false
}

variable "actions" {
  description = "Optional per-kind overrides, kind=action,... e.g. instance-stopping=ignore (ACTIONS); empty keeps the defaults."
  type        = string
  default     = ""
}

variable "managed_tag" {
  description = "The tag key an instance, or its Auto Scaling group, must carry for nth to act on it (MANAGED_TAG). One key."
  type        = string
  default     = "node-termination-handler/managed"

  validation {
    condition     = var.managed_tag != "" && !strcontains(var.managed_tag, ",")
    error_message = "managed_tag is one tag key, not empty (a tag key holds no comma)."
  }
}

variable "check_managed_tag" {
  description = "Act only on instances carrying managed_tag (CHECK_MANAGED_TAG)."
  type        = bool
  default     = true
}

variable "leave_karpenter_nodes" {
  description = "Leave nodes Karpenter launched (label karpenter.sh/nodepool) to Karpenter's own interruption handling (LEAVE_KARPENTER_NODES)."
  type        = bool
  default     = false
}

variable "lifecycle_managed_groups_only" {
  description = "With check_managed_tag: the role may complete lifecycle actions and record their heartbeats only in Auto Scaling groups that carry managed_tag (an IAM condition on autoscaling:ResourceTag), so a group must carry the tag itself for its hooks to be served. false allows every group (or auto_scaling_group_names), for instances tagged without their group."
  type        = bool
  default     = true
}

variable "drain_concurrency" {
  description = "Evictions in flight at once (DRAIN_CONCURRENCY)."
  type        = number
  default     = 16

  validation {
    condition     = var.drain_concurrency >= 1
    error_message = "drain_concurrency must be at least 1."
  }
}

variable "eviction_retry_seconds" {
  description = "Pause between evictions refused by a PodDisruptionBudget (EVICTION_RETRY_SECONDS)."
  type        = number
  default     = 5

  validation {
    condition     = var.eviction_retry_seconds >= 1
    error_message = "eviction_retry_seconds must be at least 1."
  }
}

variable "pod_termination_grace_period" {
  description = "Grace period in seconds for every evicted pod, still clipped to the deadline; null keeps each pod's own (POD_TERMINATION_GRACE_PERIOD)."
  type        = number
  default     = null

  validation {
    condition     = var.pod_termination_grace_period == null ? true : var.pod_termination_grace_period >= 0 && floor(var.pod_termination_grace_period) == var.pod_termination_grace_period
    error_message = "pod_termination_grace_period must be null or a whole number of seconds, 0 or more."
  }
}

variable "drain_empty_dir_pods" {
  description = "Evict pods with emptyDir volumes (their scratch data is lost); false leaves them on the node (DRAIN_EMPTYDIR_PODS)."
  type        = bool
  default     = true
}

variable "drain_unmanaged_pods" {
  description = "Evict pods no controller would recreate, as `kubectl drain --force`; false leaves them (DRAIN_UNMANAGED_PODS)."
  type        = bool
  default     = true
}

variable "exclude_namespaces" {
  description = "Namespaces whose pods are never evicted (EXCLUDE_NAMESPACES)."
  type        = list(string)
  default     = []
}

variable "exclude_pod_labels" {
  description = "key=value labels; pods carrying all of them are never evicted (EXCLUDE_POD_LABELS)."
  type        = list(string)
  default     = []
}

variable "exclude_from_load_balancers" {
  description = "Label the node node.kubernetes.io/exclude-from-external-load-balancers when its drain begins (EXCLUDE_FROM_LOAD_BALANCERS)."
  type        = bool
  default     = false
}

variable "out_of_service_taint" {
  description = "Taint a drained node whose instance is going away node.kubernetes.io/out-of-service, so volumes detach without waiting for the kubelet (OUT_OF_SERVICE_TAINT)."
  type        = bool
  default     = false
}

variable "lifecycle_heartbeat_seconds" {
  description = "Seconds between lifecycle-action heartbeats while a lifecycle hook's drain runs; null keeps the default, 30 (LIFECYCLE_HEARTBEAT_SECONDS)."
  type        = number
  default     = null

  validation {
    condition     = var.lifecycle_heartbeat_seconds == null ? true : var.lifecycle_heartbeat_seconds >= 0 && floor(var.lifecycle_heartbeat_seconds) == var.lifecycle_heartbeat_seconds
    error_message = "lifecycle_heartbeat_seconds must be null or a whole number of seconds, 0 or more."
  }
}

variable "lifecycle_completion_delay_seconds" {
  description = "Seconds to wait after a termination hook's drain before completing the lifecycle action, the hook kept alive meanwhile: time for load balancers to deregister the instance (LIFECYCLE_COMPLETION_DELAY_SECONDS; aws-node-termination-handler's completeLifecycleActionDelaySeconds). The drain ends that much earlier in an invocation."
  type        = number
  default     = 0

  validation {
    condition     = var.lifecycle_completion_delay_seconds >= 0 && var.lifecycle_completion_delay_seconds <= 600 && floor(var.lifecycle_completion_delay_seconds) == var.lifecycle_completion_delay_seconds
    error_message = "lifecycle_completion_delay_seconds must be a whole number of seconds from 0 to 600."
  }
}

variable "max_drain_seconds" {
  description = "The longest one node's drain goes on across invocations (MAX_DRAIN_SECONDS). When the function's timeout cuts a drain short and the instance still has time (a pending lifecycle hook, a later AWS Health start), the function invokes itself asynchronously to go on, heartbeating the hook, until the drain completes or this time has passed. 172800 (48 hours) is the longest an Auto Scaling lifecycle hook can wait."
  type        = number
  default     = 3600

  validation {
    condition     = var.max_drain_seconds >= 60 && var.max_drain_seconds <= 172800
    error_message = "max_drain_seconds must be between 60 and 172800 (48 hours)."
  }
}

variable "metrics_namespace" {
  description = "CloudWatch namespace of the metrics the function logs in embedded metric format (METRICS_NAMESPACE)."
  type        = string
  default     = "NodeTerminationHandler"
}

variable "webhook_format" {
  description = "Body of the webhook notifications: slack, teams, chime or json (WEBHOOK_FORMAT)."
  type        = string
  default     = "json"

  validation {
    condition     = contains(["slack", "teams", "chime", "json"], var.webhook_format)
    error_message = "webhook_format must be slack, teams, chime or json."
  }
}

variable "webhook_template" {
  description = "Text of the webhook notifications; empty keeps the built-in one (WEBHOOK_TEMPLATE)."
  type        = string
  default     = ""
}

variable "webhook_allow_http" {
  description = "Accept an http:// webhook URL, for a receiver inside your network; false (the default) accepts https:// only, since the URL is a credential (WEBHOOK_ALLOW_HTTP)."
  type        = bool
  default     = false
}

variable "webhook_url_secret_arn" {
  description = "Full ARN of a Secrets Manager secret holding a webhook URL to notify; empty sends none (WEBHOOK_URL_SECRET_ARN). The role may read exactly this secret."
  type        = string
  default     = ""

  # One secret, by its full ARN: a wildcard would let the role read every secret it matches.
  validation {
    condition     = can(regex("^$|^arn:[a-z-]+:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:[A-Za-z0-9/_+=.@-]+$", var.webhook_url_secret_arn))
    error_message = "webhook_url_secret_arn must be empty or the full ARN of one Secrets Manager secret (no wildcard)."
  }
}

# Events: one EventBridge rule per kind

variable "enable_spot_interruption" {
  description = "Rule for aws.ec2 EC2 Spot Instance Interruption Warning."
  type        = bool
  default     = true
}

variable "enable_rebalance_recommendation" {
  description = "Rule for aws.ec2 EC2 Instance Rebalance Recommendation."
  type        = bool
  default     = true
}

variable "enable_instance_state_change" {
  description = "Rule for aws.ec2 EC2 Instance State-change Notification (stopping, stopped, shutting-down, terminated, running)."
  type        = bool
  default     = true
}

variable "enable_capacity_reservation_interruption" {
  description = "Rule for aws.ec2 EC2 Capacity Reservation Instance Interruption Warning."
  type        = bool
  default     = true
}

variable "enable_terminate_lifecycle_action" {
  description = "Rule for aws.autoscaling EC2 Instance-terminate Lifecycle Action."
  type        = bool
  default     = true
}

variable "enable_launch_lifecycle_action" {
  description = "Rule for aws.autoscaling EC2 Instance-launch Lifecycle Action."
  type        = bool
  default     = true
}

variable "enable_scheduled_change" {
  description = "Rule for aws.health AWS Health Event, EC2 scheduledChange only."
  type        = bool
  default     = true
}

variable "auto_scaling_group_names" {
  description = "Auto Scaling group names whose lifecycle actions nth handles and may complete; empty means every group in this account and region."
  type        = list(string)
  default     = []
}

# Network (private clusters)

variable "subnet_ids" {
  description = "Subnets for the function in a private cluster's VPC; empty runs it outside any VPC. Needs security_group_ids too."
  type        = list(string)
  default     = []
}

variable "security_group_ids" {
  description = "Security groups for the function when subnet_ids is set."
  type        = list(string)
  default     = []
}

# Dashboard and alarms

variable "create_dashboard_and_alarms" {
  description = "Create a CloudWatch dashboard (interruptions, drains, pods, errors, dead-letter queue) and alarms on the dead-letter queue, on errors and on incomplete drains."
  type        = bool
  default     = true
}

variable "alarm_topic_arn" {
  description = "An existing SNS topic the alarms notify (on alarm and on recovery). Leave empty to use alarm_email, or to have alarms without actions."
  type        = string
  default     = ""

  validation {
    condition     = can(regex("^$|^arn:[a-z-]+:sns:[a-z0-9-]+:[0-9]{12}:.+$", var.alarm_topic_arn))
    error_message = "alarm_topic_arn must be empty or the ARN of an SNS topic."
  }
}

variable "alarm_email" {
  description = "An email address: creates an SNS topic for the alarms with this address subscribed (it must confirm the subscription). Only when alarm_topic_arn is empty."
  type        = string
  default     = ""

  validation {
    condition     = can(regex("^$|^[^@\\s]+@[^@\\s]+$", var.alarm_email))
    error_message = "alarm_email must be empty or an email address."
  }
}
