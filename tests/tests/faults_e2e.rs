//! Faults through the real binary: transient errors are ridden out inside the deadline; work
//! that cannot be done fails the invocation so that Lambda retries it (and, in the end,
//! keeps it in the dead-letter queue). Faults of AWS's endpoints run on both Kubernetes
//! backends; faults of the API server only the emulator can inject, so those tests run on it
//! alone, each saying why.

use std::time::Duration;

use nth_tests::on_both_backends;
use nth_tests::runtime_api::Outcome;
use nth_tests::sandbox::{sandbox_behaviour, Sandbox};

// Emulator only: injects 503, 500 and 429 answers into the API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_api_server_errors_are_retried() -> anyhow::Result<()> {
    let sandbox = Sandbox::start(&[]).await?;
    let node = sandbox.node_name().to_owned();
    sandbox
        .emulator()
        .inject_failures("GET", &format!("/api/v1/nodes/{node}"), 503, 2);
    sandbox
        .emulator()
        .inject_failures("PATCH", "/api/v1/nodes/", 500, 1);
    sandbox
        .emulator()
        .inject_failures("GET", "/api/v1/pods", 429, 2);

    let outcome = sandbox.invoke(sandbox.spot_event("flaky-1")).await?;

    assert_eq!(outcome.summary(), "drained");
    let failed = sandbox
        .emulator()
        .requests()
        .iter()
        .filter(|r| r.status >= 429)
        .count();
    assert!(failed >= 5, "the injected failures happened ({failed})");
    assert_eq!(
        sandbox.emulator().node(&node).expect("node")["spec"]["unschedulable"],
        true
    );
    Ok(())
}

on_both_backends! {
    async fn ec2_throttling_is_survived(backend: Backend) -> anyhow::Result<()> {
        let sandbox = Sandbox::start_on(backend, &[], sandbox_behaviour()).await?;
        sandbox
            .aws
            .fail("DescribeInstances", "RequestLimitExceeded", 2);

        let outcome = sandbox.invoke(sandbox.spot_event("throttled-1")).await?;

        assert_eq!(outcome.summary(), "drained", "{outcome:?}");
        let calls = sandbox.aws.count("DescribeInstances");
        assert_eq!(calls, 3, "two throttled attempts, then success");
        let node = sandbox.kube.node(sandbox.node_name()).await?.expect("node");
        assert_eq!(node["spec"]["unschedulable"], true);
        Ok(())
    }
}

// Emulator only: resets the API server's connections and hangs a PATCH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_and_a_hung_api_server_are_retried() -> anyhow::Result<()> {
    let sandbox = Sandbox::start(&[]).await?;
    let node = sandbox.node_name().to_owned();
    sandbox
        .emulator()
        .inject_reset("GET", &format!("/api/v1/nodes/{node}"), 1);
    sandbox.emulator().inject_reset("GET", "/api/v1/pods", 2);
    // Longer than the client's 20 s request timeout: the cordon is sent again.
    sandbox
        .emulator()
        .inject_delay("PATCH", "/api/v1/nodes/", Duration::from_secs(22), 1);

    let outcome = sandbox.invoke(sandbox.spot_event("resets-1")).await?;

    assert_eq!(outcome.summary(), "drained");
    let node_state = sandbox.emulator().node(&node).expect("node");
    assert_eq!(node_state["spec"]["unschedulable"], true);
    assert!(
        sandbox.emulator().pods_on(&node).len() <= 2,
        "workload pods gone"
    );
    let patches = sandbox
        .emulator()
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();
    assert!(patches >= 2, "the hung PATCH was sent again ({patches})");
    Ok(())
}

on_both_backends! {
    async fn a_hung_aws_endpoint_is_timed_out_and_retried(backend: Backend) -> anyhow::Result<()> {
        let sandbox = Sandbox::start_on(backend, &[], sandbox_behaviour()).await?;
        // Longer than the 5 s attempt timeout.
        sandbox
            .aws
            .delay("DescribeInstances", Duration::from_secs(8), 1);

        let outcome = sandbox.invoke(sandbox.spot_event("hung-aws-1")).await?;

        assert_eq!(outcome.summary(), "drained", "{outcome:?}");
        let calls = sandbox.aws.count("DescribeInstances");
        assert_eq!(calls, 2, "the hung attempt, then a fresh one");
        let node = sandbox.kube.node(sandbox.node_name()).await?.expect("node");
        assert_eq!(node["spec"]["unschedulable"], true);
        Ok(())
    }
}

// One backend is enough: the endpoint is a closed port, so no API server is reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_server_fails_the_invocation_for_a_retry() -> anyhow::Result<()> {
    let closed = nth_tests::free_port()?;
    let endpoint = format!("https://127.0.0.1:{closed}");
    let sandbox = Sandbox::start(&[("CLUSTER_ENDPOINT", endpoint.as_str())]).await?;

    let outcome = sandbox.invoke(sandbox.spot_event("down-1")).await?;

    let Outcome::Error {
        error_type,
        message,
    } = outcome
    else {
        panic!("the invocation must fail so that Lambda retries it: {outcome:?}");
    };
    assert_eq!(error_type, "InterruptionFailed");
    assert!(
        message.contains(sandbox.node_name()),
        "names the node: {message}"
    );
    Ok(())
}

// Emulator only: injects 503s into the pod list, and counts the PATCHes it received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_event_after_a_partial_drain_finishes_the_work() -> anyhow::Result<()> {
    let sandbox = Sandbox::start(&[]).await?;
    let node = sandbox.node_name().to_owned();
    // The first delivery cordons the node, then loses the API server while listing pods.
    sandbox
        .emulator()
        .inject_failures("GET", "/api/v1/pods", 503, 4);
    let first = sandbox.invoke(sandbox.spot_event("partial-1")).await?;
    assert!(matches!(first, Outcome::Error { .. }), "{first:?}");
    assert_eq!(
        sandbox.emulator().node(&node).expect("node")["spec"]["unschedulable"],
        true
    );
    let patches_before = sandbox
        .emulator()
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();

    // Lambda delivers it again.
    let second = sandbox.invoke(sandbox.spot_event("partial-1")).await?;

    assert_eq!(second.summary(), "drained");
    let patches = sandbox
        .emulator()
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();
    assert_eq!(
        patches - patches_before,
        1,
        "the cordon is not repeated; only the drain is recorded"
    );
    Ok(())
}

// Emulator only: shortens token lifetimes (the real server keeps accepted tokens 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_mid_drain_is_replaced() -> anyhow::Result<()> {
    let mut behaviour = nth_tests::sandbox::sandbox_behaviour();
    behaviour.replacement_ready_delay = std::time::Duration::from_secs(4);
    let sandbox = Sandbox::start_with(&[], behaviour).await?;
    // The API server now refuses any token older than a second: the PDB keeps the drain
    // going for several seconds, so the function's cached token is refused mid-drain.
    sandbox.emulator().set_token_lifetime(1);

    let outcome = sandbox.invoke(sandbox.spot_event("stale-token-1")).await?;

    assert_eq!(outcome.summary(), "drained");
    assert!(
        !sandbox.emulator().auth_failures().is_empty(),
        "the token was refused at least once"
    );
    assert!(
        sandbox.emulator().tokens_seen().len() >= 2,
        "a fresh token followed the refusal"
    );
    Ok(())
}
