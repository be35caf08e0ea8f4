"""Unit tests of the source scan the IAM and environment checks rely on."""

from __future__ import annotations

import sys
import tempfile
import textwrap
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rust_scan  # noqa: E402


def scan(**files: str) -> rust_scan.Scan:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "crate" / "src"
        src.mkdir(parents=True)
        for name, text in files.items():
            (src / f"{name}.rs").write_text(textwrap.dedent(text), encoding="utf-8")
        return rust_scan.scan(src)


class AwsCalls(unittest.TestCase):
    def test_fluent_chain_on_a_field(self) -> None:
        s = scan(
            lib="""
            pub struct R { ec2: aws_sdk_ec2::Client, asg: aws_sdk_autoscaling::Client }
            impl R {
                async fn f(&self) {
                    let out = self
                        .ec2
                        .describe_instances()
                        .instance_ids("i-1")
                        .send()
                        .await;
                    self.asg.describe_tags().filters(x).send().await;
                }
            }
            """
        )
        self.assertEqual(set(s.actions), {"ec2:DescribeInstances", "autoscaling:DescribeTags"})
        self.assertEqual(s.unresolved, [])

    def test_same_operation_name_in_two_services_goes_by_receiver(self) -> None:
        s = scan(
            lib="""
            fn f(ec2: &aws_sdk_ec2::Client, asg: aws_sdk_autoscaling::Client) {
                ec2.describe_tags().send();
                asg.complete_lifecycle_action().instance_id(i).send();
            }
            """
        )
        self.assertEqual(set(s.actions), {"ec2:DescribeTags", "autoscaling:CompleteLifecycleAction"})

    def test_builder_sent_later_and_client_built_locally(self) -> None:
        s = scan(
            lib="""
            async fn f(conf: &aws_config::SdkConfig) {
                let asg = aws_sdk_autoscaling::Client::new(conf);
                let request = asg.record_lifecycle_action_heartbeat().instance_id(i);
                request.send().await;
            }
            """
        )
        self.assertIn("autoscaling:RecordLifecycleActionHeartbeat", s.actions)

    def test_comments_strings_and_test_modules_do_not_count(self) -> None:
        s = scan(
            lib="""
            // self.ec2.terminate_instances().send()
            /* ec2.stop_instances().send() */
            fn f(ec2: aws_sdk_ec2::Client) {
                let _ = "ec2.reboot_instances().send()";
                ec2.describe_instances().send();
            }
            #[cfg(test)]
            mod tests {
                fn g(ec2: aws_sdk_ec2::Client) { ec2.run_instances().send(); }
            }
            """
        )
        self.assertEqual(set(s.actions), {"ec2:DescribeInstances"})

    def test_http_sends_are_not_aws_calls(self) -> None:
        s = scan(
            lib="""
            async fn notify(http: &reqwest::Client, url: &str) {
                http.post(url).json(&body).send().await;
            }
            """
        )
        self.assertEqual(s.actions, {})
        self.assertEqual(s.unresolved, [])

    def test_a_send_it_cannot_attribute_is_reported(self) -> None:
        s = scan(
            lib="""
            fn f(a: aws_sdk_ec2::Client, b: aws_sdk_autoscaling::Client) {
                make().describe_things().send();
            }
            """
        )
        self.assertEqual(len(s.unresolved), 1, s.unresolved)

    def test_requests_signed_by_hand(self) -> None:
        s = scan(
            secret="""
            async fn get(arn: &str) {
                let headers = [
                    ("content-type", "application/x-amz-json-1.1"),
                    ("x-amz-target", "secretsmanager.GetSecretValue"),
                ];
            }
            """
        )
        self.assertEqual(set(s.actions), {"secretsmanager:GetSecretValue"})
        s = scan(lib='const H: (&str, &str) = ("X-Amz-Target", "Unheard_20990101.DoThing");')
        self.assertEqual(len(s.unresolved), 1, s.unresolved)

    def test_signed_call_literals_name_their_action(self) -> None:
        s = scan(
            signed="""
            /// `SignedCall { action: "ec2:InADocComment" }` does not count.
            pub struct SignedCall<'a> {
                pub action: &'static str,
                pub path: &'a str,
            }
            """,
            clusters="""
            async fn describe(aws: &SdkConfig, path: &str) {
                let answer = signed::send(
                    aws,
                    SignedCall {
                        service: "eks",
                        action: "eks:DescribeCluster",
                        method: "GET",
                        path,
                        headers: &[("x", "action: \\"s3:InAString\\"")],
                        body: String::new(),
                    },
                )
                .await;
                let next = crate::signed::SignedCall { action: "lambda:InvokeFunction", path: &p };
                let _ = "SignedCall { action: \\"sqs:InAString\\" }";
            }
            #[cfg(test)]
            mod tests {
                fn t() { let _ = SignedCall { action: "iam:OnlyInATest", path: "/" }; }
            }
            """,
        )
        self.assertEqual(set(s.actions), {"eks:DescribeCluster", "lambda:InvokeFunction"})
        self.assertEqual(s.actions["eks:DescribeCluster"], ["crate/src/clusters.rs:5"])
        self.assertEqual(s.unresolved, [])

    def test_a_signed_call_whose_action_is_not_a_literal_is_reported(self) -> None:
        s = scan(
            lib="""
            fn f(action: &'static str) {
                send(SignedCall { action, path: "/" });
                send(SignedCall { action: ACTION, path: "/" });
                send(SignedCall { action: "DescribeCluster", path: "/" });
                send(SignedCall { path: "/", body: Body { action: "eks:Nested" } });
            }
            """
        )
        self.assertEqual(s.actions, {})
        self.assertEqual(len(s.unresolved), 4, s.unresolved)

    def test_client_methods_are_not_operations(self) -> None:
        s = scan(lib="fn f(c: aws_sdk_ec2::Client) { let _ = c.config(); c.clone(); }")
        self.assertEqual(s.actions, {})


class Environment(unittest.TestCase):
    def test_variables_read_through_the_helpers(self) -> None:
        s = scan(
            config="""
            fn f(get: impl Fn(&str) -> Option<String>) {
                let a = required(&get, "CLUSTER_NAME", "why")?;
                let b = get("TAINT_PREFIX");
                let c = flag(get, "DRY_RUN")?;
                let d = flag_or(&get, "CHECK_MANAGED_TAG", true)?;
                let e = number(&get, "DRAIN_CONCURRENCY")?;
                let f = std::env::var("LOG_LEVEL");
                let g = std::env::var_os("AWS_LAMBDA_RUNTIME_API");
                // get("IN_A_COMMENT")
            }
            """
        )
        self.assertEqual(
            set(s.env),
            {"CLUSTER_NAME", "TAINT_PREFIX", "DRY_RUN", "CHECK_MANAGED_TAG", "DRAIN_CONCURRENCY", "LOG_LEVEL", "AWS_LAMBDA_RUNTIME_API"},
        )


if __name__ == "__main__":
    unittest.main()
