terraform {
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # aws_eks_access_entry and aws_lambda_function.logging_config need 5.40 or later.
      version = ">= 5.40, < 7.0"
    }
  }
}
