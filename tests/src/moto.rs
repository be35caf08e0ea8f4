//! moto's server mode: real AWS API responses on a loopback port, reached by the real
//! aws-sdk-rust clients through AWS_ENDPOINT_URL.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use aws_sdk_ec2::types::{Placement, ResourceType, Tag, TagSpecification};
use tokio::process::{Child, Command};

use crate::{
    free_port, workspace_root, TEST_ACCESS_KEY, TEST_REGION, TEST_SECRET_KEY, TEST_SESSION_TOKEN,
};

/// moto imports a great deal on start; on a busy 2-core machine it can take a while.
const MOTO_START_TIMEOUT: Duration = Duration::from_secs(60);

/// The moto_server to run: $NTH_MOTO_SERVER, else the venv `scripts/test` makes, else PATH.
pub fn moto_server_path() -> PathBuf {
    if let Some(path) = std::env::var_os("NTH_MOTO_SERVER") {
        return PathBuf::from(path);
    }
    let venv = workspace_root().join(".venv/bin/moto_server");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("moto_server")
    }
}

#[derive(Debug)]
pub struct Moto {
    pub endpoint: String,
    child: Child,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _already_gone = self.child.start_kill();
    }
}

/// An EC2 instance created in moto.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub private_dns_name: String,
    pub availability_zone: String,
}

impl Moto {
    pub async fn start() -> anyhow::Result<Self> {
        let port = free_port()?;
        let program = moto_server_path();
        let child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (run scripts/test, which installs moto into .venv, or set NTH_MOTO_SERVER)",
                    program.display()
                )
            })?;
        let moto = Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            child,
        };
        let started = std::time::Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if started.elapsed() > MOTO_START_TIMEOUT {
                bail!("moto_server did not listen on port {port} within {MOTO_START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(moto)
    }

    pub async fn ec2(&self) -> aws_sdk_ec2::Client {
        aws_sdk_ec2::Client::new(&self.sdk_config().await)
    }

    async fn sdk_config(&self) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(TEST_REGION))
            .endpoint_url(&self.endpoint)
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                TEST_ACCESS_KEY,
                TEST_SECRET_KEY,
                Some(TEST_SESSION_TOKEN.to_owned()),
                None,
                "nth-tests",
            ))
            .load()
            .await
    }

    async fn any_image(&self) -> anyhow::Result<String> {
        self.ec2()
            .await
            .describe_images()
            .send()
            .await
            .context("moto DescribeImages")?
            .images()
            .iter()
            .find_map(|i| i.image_id().map(str::to_owned))
            .context("moto has no AMI")
    }

    /// Launches one instance in `az` with `tags`, as an EKS node group would.
    /// A Spot instance in `az` with `tags`, as the nodes of the tests are (a Spot warning is
    /// only believed for a Spot instance).
    pub async fn run_instance(&self, az: &str, tags: &[(&str, &str)]) -> anyhow::Result<Instance> {
        self.launch(az, tags, true).await
    }

    /// An On-Demand instance in `az` with `tags`.
    pub async fn run_on_demand_instance(
        &self,
        az: &str,
        tags: &[(&str, &str)],
    ) -> anyhow::Result<Instance> {
        self.launch(az, tags, false).await
    }

    /// Stops the instance (moto goes straight to `stopped`).
    pub async fn stop_instance(&self, id: &str) -> anyhow::Result<()> {
        self.ec2()
            .await
            .stop_instances()
            .instance_ids(id)
            .send()
            .await
            .context("moto StopInstances")?;
        Ok(())
    }

    /// Starts the stopped instance again.
    pub async fn start_instance(&self, id: &str) -> anyhow::Result<()> {
        self.ec2()
            .await
            .start_instances()
            .instance_ids(id)
            .send()
            .await
            .context("moto StartInstances")?;
        Ok(())
    }

    async fn launch(
        &self,
        az: &str,
        tags: &[(&str, &str)],
        spot: bool,
    ) -> anyhow::Result<Instance> {
        let ec2 = self.ec2().await;
        let image = self.any_image().await?;
        let mut spec = TagSpecification::builder().resource_type(ResourceType::Instance);
        for (k, v) in tags {
            spec = spec.tags(Tag::builder().key(*k).value(*v).build());
        }
        let output = ec2
            .run_instances()
            .image_id(image)
            .instance_type(aws_sdk_ec2::types::InstanceType::M5Large)
            .min_count(1)
            .max_count(1)
            .placement(Placement::builder().availability_zone(az).build())
            .tag_specifications(spec.build())
            .set_instance_market_options(spot.then(|| {
                aws_sdk_ec2::types::InstanceMarketOptionsRequest::builder()
                    .market_type(aws_sdk_ec2::types::MarketType::Spot)
                    .build()
            }))
            .send()
            .await
            .context("moto RunInstances")?;
        let instance = output
            .instances()
            .first()
            .context("RunInstances returned no instance")?;
        Ok(Instance {
            id: instance.instance_id().context("no instance id")?.to_owned(),
            private_dns_name: instance
                .private_dns_name()
                .context("no PrivateDnsName")?
                .to_owned(),
            availability_zone: az.to_owned(),
        })
    }
}

impl Moto {
    pub async fn autoscaling(&self) -> aws_sdk_autoscaling::Client {
        aws_sdk_autoscaling::Client::new(&self.sdk_config().await)
    }

    /// An Auto Scaling group of one instance, with `tags` on the group: those marked
    /// propagate reach the instance, the others stay on the group only.
    pub async fn run_group(
        &self,
        group: &str,
        tags: &[(&str, &str, bool)],
    ) -> anyhow::Result<Instance> {
        use aws_sdk_autoscaling::types::Tag as AsgTag;
        let asg = self.autoscaling().await;
        let image = self.any_image().await?;
        asg.create_launch_configuration()
            .launch_configuration_name(format!("{group}-lc"))
            .image_id(image)
            .instance_type("m5.large")
            .send()
            .await
            .context("moto CreateLaunchConfiguration")?;
        let mut request = asg
            .create_auto_scaling_group()
            .auto_scaling_group_name(group)
            .launch_configuration_name(format!("{group}-lc"))
            .min_size(1)
            .max_size(1)
            .desired_capacity(1)
            .availability_zones("us-east-1a");
        for (key, value, propagate) in tags {
            request = request.tags(
                AsgTag::builder()
                    .key(*key)
                    .value(*value)
                    .propagate_at_launch(*propagate)
                    .resource_id(group)
                    .resource_type("auto-scaling-group")
                    .build(),
            );
        }
        request
            .send()
            .await
            .context("moto CreateAutoScalingGroup")?;
        let groups = asg
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(group)
            .send()
            .await
            .context("moto DescribeAutoScalingGroups")?;
        let instance_id = groups
            .auto_scaling_groups()
            .first()
            .and_then(|g| g.instances().first())
            .and_then(|i| i.instance_id())
            .context("the group launched no instance")?
            .to_owned();
        let described = self
            .ec2()
            .await
            .describe_instances()
            .instance_ids(&instance_id)
            .send()
            .await
            .context("moto DescribeInstances")?;
        let instance = described
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .next()
            .context("no such instance")?;
        Ok(Instance {
            id: instance_id,
            private_dns_name: instance
                .private_dns_name()
                .context("no PrivateDnsName")?
                .to_owned(),
            availability_zone: "us-east-1a".to_owned(),
        })
    }
}

impl Moto {
    /// A Secrets Manager secret holding `value`, created with one raw JSON call (moto routes
    /// by the credential scope and does not check signatures); returns its ARN.
    pub async fn create_secret(&self, name: &str, value: &str) -> anyhow::Result<String> {
        use http_body_util::{BodyExt, Full};
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<bytes::Bytes>>();
        let day = chrono::Utc::now().format("%Y%m%d");
        let body = serde_json::json!({"Name": name, "SecretString": value}).to_string();
        let request = http::Request::post(format!("{}/", self.endpoint))
            .header("content-type", "application/x-amz-json-1.1")
            .header("x-amz-target", "secretsmanager.CreateSecret")
            .header(
                "authorization",
                format!("AWS4-HMAC-SHA256 Credential={TEST_ACCESS_KEY}/{day}/{TEST_REGION}/secretsmanager/aws4_request, SignedHeaders=host, Signature=0"),
            )
            .body(Full::new(bytes::Bytes::from(body)))?;
        let response = client.request(request).await.context("moto CreateSecret")?;
        let bytes = response.into_body().collect().await?.to_bytes();
        let answer: serde_json::Value = serde_json::from_slice(&bytes)?;
        answer["ARN"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("moto CreateSecret answered {answer}"))
    }
}
