//! One deployment, several clusters (CLUSTERS): each instance's tags name its cluster, whose
//! endpoint and CA come from eks:DescribeCluster, once per cluster per container. Two
//! Kubernetes API servers stand in for two EKS clusters; each checks that the token it is
//! given was minted for it. On the real backend the sandbox's home cluster is the real
//! control plane and the second cluster is an emulator (there is only one real control
//! plane); on the emulator backend both are emulators.

use nth_tests::cluster::{Backend, Cluster};
use nth_tests::fixtures;
use nth_tests::kube::{AuthConfig, KubeApi};
use nth_tests::moto::Instance;
use nth_tests::on_both_backends;
use nth_tests::runtime_api::Outcome;
use nth_tests::sandbox::{self, add_node_to, sandbox_behaviour, Sandbox, CLUSTER, MANAGED_TAG};
use nth_tests::TEST_SECRET_KEY;
use serde_json::Value;

/// The sandbox's function with CLUSTERS instead of one cluster's name and endpoint.
async fn serving(backend: Backend, clusters: &str) -> anyhow::Result<Sandbox> {
    Sandbox::start_on(
        backend,
        &[
            ("CLUSTERS", clusters),
            ("CLUSTER_NAME", ""),
            ("CLUSTER_ENDPOINT", ""),
            ("CLUSTER_CA_DATA", ""),
        ],
        sandbox_behaviour(),
    )
    .await
}

/// A second emulated cluster, known to eks:DescribeCluster.
async fn second_cluster(sandbox: &Sandbox, name: &str) -> anyhow::Result<KubeApi> {
    let kube = KubeApi::start(
        AuthConfig {
            cluster_name: name.to_owned(),
            secret_access_key: Some(TEST_SECRET_KEY.to_owned()),
        },
        sandbox::sandbox_behaviour(),
    )
    .await?;
    sandbox.aws.add_cluster(name, &kube.url, &kube.ca_pem);
    Ok(kube)
}

async fn managed_instance(
    sandbox: &Sandbox,
    cluster_tag: (&str, &str),
) -> anyhow::Result<Instance> {
    sandbox
        .moto
        .run_instance("us-east-1b", &[cluster_tag, (MANAGED_TAG, "true")])
        .await
}

fn spot(instance: &Instance, id: &str) -> Value {
    sandbox::event(
        id,
        "aws.ec2",
        "EC2 Spot Instance Interruption Warning",
        &instance.id,
        serde_json::json!({ "instance-id": instance.id, "instance-action": "terminate" }),
    )
}

fn unschedulable(kube: &KubeApi, node: &str) -> bool {
    kube.node(node).expect("node")["spec"]["unschedulable"] == true
}

/// Whether the node in the sandbox's home cluster (either backend) is cordoned.
async fn home_unschedulable(sandbox: &Sandbox, node: &str) -> anyhow::Result<bool> {
    let node = sandbox.kube.node(node).await?.expect("node");
    Ok(node["spec"]["unschedulable"] == true)
}

/// Requests an emulator saw that name `node`.
fn requests_about(kube: &KubeApi, node: &str) -> usize {
    kube.requests()
        .iter()
        .filter(|r| r.uri.contains(node))
        .count()
}

on_both_backends! {
    async fn one_deployment_drains_nodes_in_each_listed_cluster(backend: Backend) -> anyhow::Result<()> {
        let sandbox = serving(backend, &format!("{CLUSTER}, blue")).await?;
        let blue = Cluster::Emulator(second_cluster(&sandbox, "blue").await?);
        let blue_instance = managed_instance(&sandbox, ("kubernetes.io/cluster/blue", "owned")).await?;
        add_node_to(&blue, &blue_instance, 3).await?;
        let blue = blue.emulator().expect("the blue cluster is emulated");
        let blue_node = blue_instance.private_dns_name.clone();

        let home = sandbox.invoke(sandbox.spot_event("clusters-home")).await?;
        let away = sandbox
            .invoke(spot(&blue_instance, "clusters-blue"))
            .await?;

        assert_eq!(home.summary(), "drained", "{home:?}");
        assert_eq!(away.summary(), "drained", "{away:?}");
        assert!(home_unschedulable(&sandbox, sandbox.node_name()).await?);
        assert!(unschedulable(blue, &blue_node));
        let left: Vec<String> = blue
            .pods_on(&blue_node)
            .iter()
            .filter_map(|p| p["metadata"]["labels"]["app"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(
            left,
            ["aws-node"],
            "only the DaemonSet pod stays on the blue node"
        );
        assert_eq!(
            requests_about(blue, sandbox.node_name()),
            0,
            "the home instance's node was looked for in the home cluster only"
        );
        if let Some(home_emulator) = sandbox.kube.emulator() {
            assert_eq!(
                requests_about(home_emulator, &blue_node),
                0,
                "the blue instance's node was looked for in the blue cluster only"
            );
        }
        assert!(
            blue.auth_failures().is_empty(),
            "{:?}",
            blue.auth_failures()
        );
        assert!(sandbox.kube.auth_failures().is_empty(), "{:?}", sandbox.kube.auth_failures());

        // A warm container keeps what it learnt: the event delivered again asks EKS nothing.
        let again = sandbox
            .invoke(spot(&blue_instance, "clusters-blue"))
            .await?;
        assert_eq!(again.summary(), "already-drained");
        assert_eq!(
            sandbox.aws.count("DescribeCluster"),
            2,
            "one DescribeCluster per cluster"
        );
        Ok(())
    }
}

on_both_backends! {
    async fn instances_of_unlisted_or_unnamed_clusters_are_never_touched(backend: Backend) -> anyhow::Result<()> {
        let sandbox = serving(backend, "blue").await?;
        let blue = second_cluster(&sandbox, "blue").await?;
        // Its node sits in the sandbox cluster, but its tags say green, which is not served.
        let green = managed_instance(&sandbox, ("eks:cluster-name", "green")).await?;
        sandbox.add_node(&green, 2).await?;
        let untagged = sandbox
            .moto
            .run_instance("us-east-1b", &[(MANAGED_TAG, "true")])
            .await?;
        sandbox.add_node(&untagged, 2).await?;

        let not_listed = sandbox.invoke(spot(&green, "clusters-green")).await?;
        let no_tag = sandbox.invoke(spot(&untagged, "clusters-untagged")).await?;
        // The sandbox's own instance is tagged for a cluster this deployment does not list.
        let home = sandbox
            .invoke(sandbox.spot_event("clusters-unlisted-home"))
            .await?;

        assert!(not_listed
            .summary()
            .contains("green, which is not in CLUSTERS"));
        assert!(no_tag.summary().contains("no cluster tag"));
        assert!(home.summary().contains("not in CLUSTERS"));
        for node in [&green.private_dns_name, &untagged.private_dns_name] {
            assert!(!home_unschedulable(&sandbox, node).await?);
            assert_eq!(sandbox.kube.pods_on(node).await?.len(), 3);
        }
        assert!(!home_unschedulable(&sandbox, sandbox.node_name()).await?);
        assert_eq!(sandbox.kube.pods_on(sandbox.node_name()).await?.len(), 10);
        if let Some(home_emulator) = sandbox.kube.emulator() {
            assert!(
                home_emulator.requests().is_empty(),
                "no cluster was called"
            );
        }
        assert!(blue.requests().is_empty());
        assert_eq!(sandbox.aws.count("DescribeCluster"), 0);
        Ok(())
    }
}

on_both_backends! {
    async fn star_serves_every_cluster_the_account_has(backend: Backend) -> anyhow::Result<()> {
        let sandbox = serving(backend, "*").await?;
        let ghost = managed_instance(&sandbox, ("eks:cluster-name", "ghost")).await?;
        sandbox.add_node(&ghost, 1).await?;
        // EKS throttles the first two lookups; the function tries again.
        sandbox
            .aws
            .fail("DescribeCluster", "ThrottlingException", 2);

        let home = sandbox.invoke(sandbox.spot_event("clusters-star")).await?;
        let unknown = sandbox.invoke(spot(&ghost, "clusters-ghost")).await?;

        assert_eq!(home.summary(), "drained", "{home:?}");
        assert!(home_unschedulable(&sandbox, sandbox.node_name()).await?);
        let Outcome::Response(_) = &unknown else {
            panic!("a cluster EKS does not know is not an error to retry: {unknown:?}");
        };
        assert!(
            unknown
                .summary()
                .contains("cluster ghost, which is not in this account"),
            "{}",
            unknown.summary()
        );
        assert!(!home_unschedulable(&sandbox, &ghost.private_dns_name).await?);
        Ok(())
    }
}

on_both_backends! {
    async fn cluster_name_alone_is_enough(backend: Backend) -> anyhow::Result<()> {
        let sandbox = Sandbox::start_on(
            backend,
            &[("CLUSTER_ENDPOINT", ""), ("CLUSTER_CA_DATA", "")],
            sandbox_behaviour(),
        )
        .await?;

        let outcome = sandbox
            .invoke(sandbox.spot_event("clusters-name-only"))
            .await?;

        assert_eq!(outcome.summary(), "drained", "{outcome:?}");
        assert!(home_unschedulable(&sandbox, sandbox.node_name()).await?);
        assert_eq!(sandbox.aws.count("DescribeCluster"), 1);
        Ok(())
    }
}

on_both_backends! {
    async fn a_cluster_eks_cannot_describe_fails_the_invocation_for_a_retry(backend: Backend) -> anyhow::Result<()> {
        let sandbox = serving(backend, CLUSTER).await?;
        sandbox.aws.fail("DescribeCluster", "InternalFailure", 3);

        let outcome = sandbox
            .invoke(sandbox.spot_event("clusters-eks-down"))
            .await?;

        let message = outcome.summary();
        assert!(
            message.starts_with("InterruptionFailed")
                && message.contains("eks:DescribeCluster of sandbox")
                && message.contains(&sandbox.instance.id),
            "{message}"
        );
        assert!(!home_unschedulable(&sandbox, sandbox.node_name()).await?);
        let retried = sandbox
            .invoke(sandbox.spot_event("clusters-eks-down"))
            .await?;
        assert_eq!(retried.summary(), "drained", "{retried:?}");
        Ok(())
    }
}

on_both_backends! {
    async fn with_several_clusters_a_node_without_a_provider_id_is_never_taken_by_its_name(backend: Backend) -> anyhow::Result<()> {
        let sandbox = serving(backend, &format!("{CLUSTER}, blue")).await?;
        let blue = second_cluster(&sandbox, "blue").await?;
        let instance = managed_instance(&sandbox, ("kubernetes.io/cluster/blue", "owned")).await?;
        // Named like the instance, but nothing says it is that instance: in another cluster
        // (which tags anyone with ec2:CreateTags can point at) it may be someone else's.
        let mut node = fixtures::node(&instance.private_dns_name, &instance.id, "us-east-1b");
        if let Some(spec) = node["spec"].as_object_mut() {
            spec.remove("providerID");
        }
        blue.world(|w| w.add_node(node));

        let outcome = sandbox.invoke(spot(&instance, "clusters-no-pid")).await?;

        assert_eq!(outcome.summary(), "no node for this instance in the cluster", "{outcome:?}");
        assert!(!unschedulable(&blue, &instance.private_dns_name));
        Ok(())
    }
}
