use super::*;
use serde_json::json;

fn sample(name: &str) -> Value {
    let path = format!(
        "{}/../tests/events/eventbridge/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).expect("sample exists"))
        .expect("sample is JSON")
}

fn interruptions(event: &Value) -> Vec<Interruption> {
    match parse(event) {
        Ok(Parsed::Interruptions(list)) => list,
        other => panic!("expected interruptions, got {other:?}"),
    }
}

fn skipped(event: &Value) -> String {
    match parse(event) {
        Ok(Parsed::Skipped(reason)) => reason,
        other => panic!("expected a skip, got {other:?}"),
    }
}

#[test]
fn spot_warning_becomes_an_interruption_with_a_two_minute_deadline() {
    let list = interruptions(&sample("spot-interruption-warning.json"));
    assert_eq!(list.len(), 1);
    let i = &list[0];
    assert_eq!(i.instance_id, "i-0b662ef9931388ba0");
    assert_eq!(i.kind, InterruptionKind::SpotInterruption);
    assert_eq!(i.detail, "terminate");
    assert_eq!(
        i.deadline.map(|d| d.to_rfc3339()),
        Some("2026-11-02T14:07:03+00:00".to_owned())
    );
}

#[test]
fn spot_stop_and_hibernate_are_interruptions_too() {
    for action in ["stop", "hibernate"] {
        let mut event = sample("spot-interruption-warning.json");
        event["detail"]["instance-action"] = json!(action);
        assert_eq!(interruptions(&event)[0].detail, action);
    }
}

#[test]
fn extra_fields_and_fractional_times_are_accepted() {
    let mut event = sample("spot-interruption-warning.json");
    event["time"] = json!("2026-11-02T14:05:03.123Z");
    event["replay-name"] = json!("x");
    event["detail"]["new-field"] = json!(1);
    assert_eq!(interruptions(&event).len(), 1);
}

#[test]
fn missing_instance_id_names_the_field() {
    let mut event = sample("spot-interruption-warning.json");
    event["detail"]
        .as_object_mut()
        .map(|d| d.remove("instance-id"));
    let message = parse(&event).expect_err("must fail").to_string();
    assert!(message.contains("instance-id"), "{message}");
    assert!(message.contains("1e5527d7"), "{message}");
}

#[test]
fn wrong_type_and_bad_instance_id_name_the_field() {
    let mut event = sample("spot-interruption-warning.json");
    event["detail"]["instance-id"] = json!(42);
    assert!(parse(&event)
        .expect_err("must fail")
        .to_string()
        .contains("detail.instance-id"));
    event["detail"]["instance-id"] = json!("sir-123");
    assert!(parse(&event)
        .expect_err("must fail")
        .to_string()
        .contains("detail.instance-id"));
    event["detail"] = json!("not an object");
    assert!(parse(&event)
        .expect_err("must fail")
        .to_string()
        .contains("detail"));
}

#[test]
fn missing_time_is_an_error_not_a_guess() {
    let mut event = sample("spot-interruption-warning.json");
    event.as_object_mut().map(|o| o.remove("time"));
    assert!(parse(&event)
        .expect_err("must fail")
        .to_string()
        .contains("time"));
}

#[test]
fn rebalance_recommendation_has_no_deadline() {
    let list = interruptions(&sample("rebalance-recommendation.json"));
    assert_eq!(list[0].kind, InterruptionKind::RebalanceRecommendation);
    assert_eq!(list[0].deadline, None);
}

#[test]
fn capacity_reservation_warning_is_an_interruption() {
    let event = json!({
        "id": "cr-1", "time": "2026-11-02T14:05:03Z", "source": "aws.ec2",
        "detail-type": "EC2 Capacity Reservation Instance Interruption Warning",
        "detail": {"instance-id": "i-0123456789abcdef0", "capacity-reservation-id": "cr-0abc"}
    });
    let list = interruptions(&event);
    assert_eq!(
        list[0].kind,
        InterruptionKind::CapacityReservationInterruption
    );
    assert!(list[0].deadline.is_some());
}

#[test]
fn terminate_lifecycle_action_carries_the_hook() {
    let list = interruptions(&sample("asg-terminate-lifecycle-action.json"));
    let i = &list[0];
    assert_eq!(i.kind, InterruptionKind::AsgTermination);
    assert_eq!(i.instance_id, "i-0633ac2b0d9769723");
    let lc = i.lifecycle.as_ref().expect("lifecycle");
    assert_eq!(lc.group, "eks-workers-a");
    assert_eq!(lc.hook, "node-drain");
    assert_eq!(lc.token, "0befcbdb-6ecd-498a-9ff7-ae9b54447cd6");
    assert_eq!(lc.transition, "autoscaling:EC2_INSTANCE_TERMINATING");
}

#[test]
fn warm_pool_transition_is_a_termination_too() {
    let mut event = sample("asg-terminate-lifecycle-action.json");
    event["detail"]["Origin"] = json!("AutoScalingGroup");
    event["detail"]["Destination"] = json!("WarmPool");
    let list = interruptions(&event);
    assert_eq!(list[0].kind, InterruptionKind::AsgTermination);
    assert!(list[0].detail.contains("WarmPool"));
}

#[test]
fn lifecycle_test_notification_is_skipped() {
    let mut event = sample("asg-terminate-lifecycle-action.json");
    event["detail"] = json!({
        "AutoScalingGroupName": "eks-workers-a", "Event": "autoscaling:TEST_NOTIFICATION",
        "Service": "AWS Auto Scaling", "Time": "2026-11-02T22:19:58Z"
    });
    assert!(skipped(&event).contains("TEST_NOTIFICATION"));
    let mut event = sample("asg-terminate-lifecycle-action.json");
    event["detail"]["LifecycleTransition"] = json!("autoscaling:TEST_NOTIFICATION");
    assert!(skipped(&event).contains("TEST_NOTIFICATION"));
}

#[test]
fn lifecycle_action_without_token_names_the_field() {
    let mut event = sample("asg-terminate-lifecycle-action.json");
    event["detail"]
        .as_object_mut()
        .map(|d| d.remove("LifecycleActionToken"));
    let message = parse(&event).expect_err("must fail").to_string();
    assert!(message.contains("LifecycleActionToken"), "{message}");
}

#[test]
fn launch_lifecycle_action_waits_for_the_node() {
    let list = interruptions(&sample("asg-launch-lifecycle-action.json"));
    assert_eq!(list[0].kind, InterruptionKind::AsgLaunch);
    assert_eq!(
        list[0].lifecycle.as_ref().map(|l| l.hook.as_str()),
        Some("node-join")
    );
}

#[test]
fn state_changes_map_to_stopping_running_or_skip() {
    let mut event = sample("instance-state-change.json");
    for state in ["stopping", "stopped", "shutting-down", "terminated"] {
        event["detail"]["state"] = json!(state);
        let i = &interruptions(&event)[0];
        assert_eq!(i.kind, InterruptionKind::InstanceStopping, "{state}");
        assert!(i.deadline.is_some());
    }
    event["detail"]["state"] = json!("running");
    assert_eq!(
        interruptions(&event)[0].kind,
        InterruptionKind::InstanceRunning
    );
    event["detail"]["state"] = json!("pending");
    assert!(skipped(&event).contains("pending"));
}

#[test]
fn health_event_gives_each_instance_its_own_interruption() {
    let list = interruptions(&sample("aws-health-scheduled-change.json"));
    assert_eq!(list.len(), 2);
    assert_ne!(
        list[0].id, list[1].id,
        "one instance's record must not shadow another's"
    );
    assert!(list
        .iter()
        .all(|i| i.kind == InterruptionKind::ScheduledMaintenance));
    assert_eq!(
        list[0].deadline.map(|d| d.to_rfc3339()),
        Some("2026-11-02T06:02:51+00:00".to_owned())
    );
}

#[test]
fn oversize_events_are_parsed_whole_and_unknown_bulk_ignored() {
    // EventBridge caps an event at 256 KiB; a payload four times that still parses, its
    // unknown fields ignored.
    let mut spot = sample("spot-interruption-warning.json");
    spot["detail"]["padding"] = json!("x".repeat(1 << 20));
    spot["resources"] = json!(vec!["arn:aws:ec2:us-east-1:1:instance/i-0"; 10_000]);
    assert_eq!(interruptions(&spot).len(), 1);

    // A Health event naming thousands of instances gives each its own interruption (the
    // handler works through them a bounded number at a time); duplicates collapse to one.
    let mut health = sample("aws-health-scheduled-change.json");
    let mut entities: Vec<Value> = (0..5_000)
        .map(|n| json!({ "entityValue": format!("i-{n:017x}") }))
        .collect();
    entities.push(json!({ "entityValue": "i-00000000000000000" }));
    health["detail"]["affectedEntities"] = json!(entities);
    let list = interruptions(&health);
    let ids: std::collections::HashSet<&str> = list.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(list.len(), 5_000);
    assert_eq!(ids.len(), 5_000);
}

#[test]
fn health_event_without_end_time_or_entities_uses_resources() {
    let mut event = sample("aws-health-scheduled-change.json");
    let detail = event["detail"].as_object_mut().expect("object");
    detail.remove("endTime");
    detail.remove("affectedEntities");
    assert_eq!(interruptions(&event).len(), 2);
}

#[test]
fn health_entity_tags_are_accepted() {
    let mut event = sample("aws-health-scheduled-change.json");
    event["detail"]["affectedEntities"] =
        json!([{"entityValue": "i-0a1b2c3d4e5f60718", "tags": {"team": "a"}}]);
    assert_eq!(interruptions(&event).len(), 1);
}

#[test]
fn health_events_of_other_services_or_categories_are_skipped() {
    let mut event = sample("aws-health-scheduled-change.json");
    event["detail"]["eventTypeCategory"] = json!("issue");
    assert!(skipped(&event).contains("issue"));
    let mut event = sample("aws-health-scheduled-change.json");
    event["detail"]["service"] = json!("RDS");
    assert!(skipped(&event).contains("RDS"));
}

#[test]
fn health_start_time_must_be_a_time() {
    let mut event = sample("aws-health-scheduled-change.json");
    event["detail"]["startTime"] = json!("next tuesday");
    assert!(parse(&event)
        .expect_err("must fail")
        .to_string()
        .contains("detail.startTime"));
}

#[test]
fn unknown_detail_types_and_sources_are_skipped() {
    let event = json!({"id": "x", "source": "aws.ec2", "detail-type": "EC2 AMI State Change", "detail": {}});
    assert!(skipped(&event).contains("EC2 AMI State Change"));
    let mut spoofed = sample("spot-interruption-warning.json");
    spoofed["source"] = json!("my.app");
    assert!(skipped(&spoofed).contains("my.app"));
}

#[test]
fn non_eventbridge_input_names_the_missing_envelope_field() {
    let err = parse(&json!({"hello": "world"})).expect_err("must fail");
    assert!(err.to_string().contains("detail-type"), "{err}");
}

/// A deterministic generator, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn arbitrary(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth > 3 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.next().is_multiple_of(2)),
        2 => json!(rng.next() as i64),
        3 => json!(
            [
                "",
                "i-",
                "i-0123456789abcdef0",
                "2026-13-45T99:99:99Z",
                "Mon, 32 Foo 2026",
                "\u{0}\u{ffff}",
                "x".repeat(10_000).as_str()
            ][rng.below(7)]
        ),
        4 => json!(-1.5e308),
        5 => Value::Array(
            (0..rng.below(4))
                .map(|_| arbitrary(rng, depth + 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.below(4))
                .map(|i| (format!("k{i}"), arbitrary(rng, depth + 1)))
                .collect(),
        ),
    }
}

/// Every path to a value in `v`, as JSON pointers.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Object(map) => map
            .iter()
            .for_each(|(k, c)| pointers(c, format!("{at}/{k}"), out)),
        Value::Array(list) => list
            .iter()
            .enumerate()
            .for_each(|(i, c)| pointers(c, format!("{at}/{i}"), out)),
        _ => {}
    }
}

/// Property: whatever is done to a real event (a field removed, replaced by any value,
/// anything added), parsing never panics, and an error says which field is wrong.
#[test]
fn mutated_events_never_panic_and_errors_name_a_field() {
    let samples = [
        "spot-interruption-warning.json",
        "rebalance-recommendation.json",
        "asg-terminate-lifecycle-action.json",
        "asg-launch-lifecycle-action.json",
        "instance-state-change.json",
        "aws-health-scheduled-change.json",
    ];
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let mut errors = 0;
    for name in samples {
        let original = sample(name);
        let mut paths = Vec::new();
        pointers(&original, String::new(), &mut paths);
        for _ in 0..2_000 {
            let mut event = original.clone();
            for _ in 0..=rng.below(3) {
                let path = &paths[rng.below(paths.len())];
                let (parent, key) = path.rsplit_once('/').unwrap_or(("", ""));
                let replacement = arbitrary(&mut rng, 0);
                match (rng.below(3), event.pointer_mut(parent)) {
                    (0, Some(Value::Object(map))) => {
                        map.remove(key);
                    }
                    (1, Some(Value::Object(map))) => {
                        map.insert(format!("extra{}", rng.below(9)), replacement);
                    }
                    (_, _) => {
                        if let Some(slot) = event.pointer_mut(path) {
                            *slot = replacement;
                        }
                    }
                }
            }
            if let Err(error) = parse(&event) {
                errors += 1;
                let message = error.to_string();
                let names_a_field = match &error {
                    EventError::Envelope { path, .. } => !path.is_empty(),
                    EventError::Malformed { path, .. } => {
                        path == "id" || path == "time" || path.starts_with("detail")
                    }
                };
                assert!(names_a_field, "{name}: error names no field: {message}");
            }
        }
    }
    assert!(
        errors > 1_000,
        "the mutations do reach the error paths ({errors} errors)"
    );
}
