# nth for one EKS cluster, with the zip built by `scripts/package` (cargo lambda).
#
#   scripts/package --arm64              # or --x86-64 with architecture = "x86_64"
#   cd terraform/examples/basic
#   terraform init
#   terraform apply -var cluster_name=my-cluster -var region=us-east-1
#   kubectl apply -f ../../../deploy/rbac.yaml

provider "aws" {
  region = var.region
}

data "aws_eks_cluster" "this" {
  name = var.cluster_name
}

module "nth" {
  source = "../.."

  cluster_name     = data.aws_eks_cluster.this.name
  cluster_endpoint = data.aws_eks_cluster.this.endpoint
  cluster_ca_data  = data.aws_eks_cluster.this.certificate_authority[0].data

  architecture    = var.architecture
  lambda_zip_path = "${path.root}/../../../target/lambda/nth-lambda/bootstrap.zip"

  # Start in dry run: every write is logged, none is made. Set false once the log reads right.
  dry_run = var.dry_run

  # The dashboard and alarms are created by default; an address here gets the alarms by email.
  alarm_email = var.alarm_email

  tags = { "app" = "nth" }
}
