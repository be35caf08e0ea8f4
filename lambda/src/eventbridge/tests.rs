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

/// Years at and beyond chrono's range, a year 0 and a leap second: never a panic, and a time
/// outside the window a real event can have is an error naming `time` and the value.
#[test]
fn extreme_event_times_are_malformed_not_a_panic() {
    for (time, expect) in [
        ("+262142-12-31T23:59:59Z", Some("+262142")),
        ("-262143-01-01T00:00:00Z", Some("-262143")),
        ("0000-01-01T00:00:00Z", Some("0000-01-01")),
        ("9999-12-31T23:59:60Z", Some("9999-12-31")),
        ("2999-01-01T00:00:00Z", Some("2999-01-01")),
        ("2006-08-24T23:59:59Z", Some("2006-08-24")),
        ("2006-08-25T00:00:00Z", None),
    ] {
        for name in [
            "spot-interruption-warning.json",
            "instance-state-change.json",
            "asg-terminate-lifecycle-action.json",
            "aws-health-scheduled-change.json",
        ] {
            let mut event = sample(name);
            event["time"] = json!(time);
            let parsed = std::panic::catch_unwind(|| parse(&event))
                .unwrap_or_else(|_| panic!("{name} with time {time} panicked"));
            match (parsed, expect) {
                (Err(EventError::Malformed { path, message, .. }), Some(value)) => {
                    assert_eq!(path, "time", "{message}");
                    assert!(message.contains(value), "{message}");
                }
                (Ok(_), None) => {}
                (other, _) => panic!("{name} with time {time}: {other:?}"),
            }
        }
    }
}

#[test]
fn event_times_may_be_a_little_ahead_but_not_a_day() {
    let mut event = sample("spot-interruption-warning.json");
    let now = chrono::Utc::now();
    event["time"] = json!((now + TimeDelta::hours(1)).to_rfc3339());
    assert!(interruptions(&event)[0].deadline.is_some());
    event["time"] = json!((now + MAX_FUTURE_SKEW + TimeDelta::minutes(5)).to_rfc3339());
    let message = parse(&event).expect_err("a day ahead").to_string();
    assert!(
        message.contains("time: ") && message.contains("ahead"),
        "{message}"
    );
    // Old events are redelivered (dead-letter redrive, archive replay): not malformed.
    event["time"] = json!("2016-06-05T06:27:57Z");
    assert_eq!(interruptions(&event).len(), 1);
}

/// An unreadable maintenance start only costs the deadline: every instance is still
/// drained, without one.
#[test]
fn health_start_time_unreadable_or_empty_means_no_deadline() {
    for start in [
        json!("next tuesday"),
        json!(""),
        json!("   "),
        json!(1_700_000_000),
        json!(null),
        json!("2026-13-45T99:99:99Z"),
    ] {
        let mut event = sample("aws-health-scheduled-change.json");
        event["detail"]["startTime"] = start.clone();
        event["detail"]["endTime"] = json!("");
        let list = interruptions(&event);
        assert_eq!(list.len(), 2, "{start}");
        assert!(list.iter().all(|i| i.deadline.is_none()), "{start}");
    }
}

/// AWS's own documented Health sample: 5 June 2016 was a Sunday, the sample says Sat.
#[test]
fn health_start_time_with_a_wrong_weekday_is_read_by_its_date() {
    let list = interruptions(&sample("aws-health-documentation-sample.json"));
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].instance_id, "i-12345678");
    assert_eq!(
        list[0].deadline.map(|d| d.to_rfc3339()),
        Some("2016-06-05T15:10:09+00:00".to_owned())
    );
    for (text, expect) in [
        ("Sat, 05 Jun 2016 15:10:09 GMT", "2016-06-05T15:10:09+00:00"),
        ("Sun, 05 Jun 2016 15:10:09 GMT", "2016-06-05T15:10:09+00:00"),
        ("05 Jun 2016 15:10:09 GMT", "2016-06-05T15:10:09+00:00"),
        (
            "Mon, 2 Nov 2026 06:02:51 +0100",
            "2026-11-02T05:02:51+00:00",
        ),
        ("2026-11-02T06:02:51Z", "2026-11-02T06:02:51+00:00"),
        (
            "2026-11-02T06:02:51.5+02:00",
            "2026-11-02T04:02:51.500+00:00",
        ),
    ] {
        assert_eq!(
            health_time("detail.startTime", &json!(text)).map(|t| t.to_rfc3339()),
            Ok(expect.to_owned()),
            "{text}"
        );
    }
}

/// A time that cannot be read is reported under the format its shape asked for, not under
/// the other format's complaint.
#[test]
fn health_time_errors_quote_the_format_tried() {
    let error = |text: &str| {
        health_time("detail.startTime", &json!(text))
            .expect_err("unreadable")
            .to_string()
    };
    let message = error("Sat, 31 Foo 2016 15:10:09 GMT");
    assert!(
        message.starts_with(
            "detail.startTime: \"Sat, 31 Foo 2016 15:10:09 GMT\" is not an RFC 2822 time"
        ),
        "{message}"
    );
    let message = error("2026-13-45T99:99:99Z");
    assert!(
        message.starts_with("detail.startTime: \"2026-13-45T99:99:99Z\" is not an RFC 3339 time"),
        "{message}"
    );
    // Not a four-digit year: RFC 3339 refuses it, and says so.
    let message = error("+262142-12-31T23:59:59Z");
    assert!(message.contains("is not an RFC 3339 time"), "{message}");
    assert_eq!(error(" "), "detail.startTime: empty");
    assert!(health_time("detail.startTime", &json!(7))
        .expect_err("a number")
        .to_string()
        .contains("detail.startTime: a number, not a string"));
}

/// One entity AWS (or a mutation) wrote badly never fails the event's other instances.
#[test]
fn a_bad_health_entity_never_fails_the_others() {
    let mut event = sample("aws-health-scheduled-change.json");
    event["detail"]["affectedEntities"] = json!([
        {"entityValue": 42},
        {"tags": {"team": "a"}},
        "i-0ffffffffffffffff",
        {"entityValue": "123456789012"},
        {"entityValue": "i-0a1b2c3d4e5f60718", "statusCode": "IMPAIRED"},
    ]);
    let list = interruptions(&event);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].instance_id, "i-0a1b2c3d4e5f60718");
    // A list that is not a list falls back on the event's resources.
    event["detail"]["affectedEntities"] = json!("i-0a1b2c3d4e5f60718");
    assert_eq!(interruptions(&event).len(), 2);
}

/// AWS Health publishes one event several times (upcoming, open, updates, closed), each
/// under a new EventBridge id: the interruption ids come from the eventArn, so the node's
/// marks recognise every publication as the one they record and drain once.
#[test]
fn health_republished_under_a_new_id_is_the_same_interruption() {
    let first = sample("aws-health-scheduled-change.json");
    let mut again = first.clone();
    again["id"] = json!("0d1c6a47-2f1e-4d27-9c3b-5a4e8f7b6c21");
    again["time"] = json!("2026-11-02T03:10:00Z");
    again["detail"]["statusCode"] = json!("open");
    let ids =
        |event: &Value| -> Vec<String> { interruptions(event).into_iter().map(|i| i.id).collect() };
    assert_eq!(ids(&first), ids(&again));
    assert!(
        ids(&first)[0].starts_with("arn:aws:health:"),
        "{:?}",
        ids(&first)
    );
    // Without an eventArn, the EventBridge id is all there is.
    let mut anonymous = first.clone();
    anonymous["detail"]
        .as_object_mut()
        .map(|d| d.remove("eventArn"));
    assert!(ids(&anonymous)[0].starts_with("7fb65329"));
}

#[test]
fn health_statuses_upcoming_and_open_drain_closed_never_does() {
    for status in ["upcoming", "open"] {
        let mut event = sample("aws-health-scheduled-change.json");
        event["detail"]["statusCode"] = json!(status);
        assert!(interruptions(&event)
            .iter()
            .all(|i| i.kind == InterruptionKind::ScheduledMaintenance));
    }
    // A closed retirement: nothing to drain after the fact, nothing to give back.
    let mut event = sample("aws-health-scheduled-change.json");
    event["detail"]["statusCode"] = json!("closed");
    let reason = skipped(&event);
    assert!(
        reason.contains("closed") && reason.contains("RETIREMENT"),
        "{reason}"
    );
    event["detail"]["statusCode"] = json!("resolved-ish");
    assert!(skipped(&event).contains("resolved-ish"));
}

#[test]
fn a_closed_reboot_maintenance_gives_each_instance_back() {
    let closed = sample("aws-health-reboot-maintenance-closed.json");
    let list = interruptions(&closed);
    assert_eq!(list.len(), 2);
    for i in &list {
        assert_eq!(i.kind, InterruptionKind::MaintenanceClosed);
        assert_eq!(
            i.kind.restores(),
            Some(InterruptionKind::ScheduledMaintenance)
        );
        assert_eq!(i.deadline, None, "nothing is drained: no deadline");
        assert!(i.detail.ends_with("closed"), "{}", i.detail);
    }
    // The same ids as the event's upcoming publication marked the nodes with.
    let mut upcoming = closed.clone();
    upcoming["detail"]["statusCode"] = json!("upcoming");
    let marked = interruptions(&upcoming);
    assert!(marked
        .iter()
        .all(|i| i.kind == InterruptionKind::ScheduledMaintenance));
    assert_eq!(
        marked.iter().map(|i| &i.id).collect::<Vec<_>>(),
        list.iter().map(|i| &i.id).collect::<Vec<_>>()
    );
    let mut instance_reboot = closed.clone();
    instance_reboot["detail"]["eventTypeCode"] =
        json!("AWS_EC2_INSTANCE_REBOOT_MAINTENANCE_SCHEDULED");
    assert_eq!(
        interruptions(&instance_reboot)[0].kind,
        InterruptionKind::MaintenanceClosed
    );
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
                "x".repeat(10_000).as_str(),
                "+262142-12-31T23:59:59Z",
                "-262143-01-01T00:00:00Z",
                "0000-01-01T00:00:00Z",
                "9999-12-31T23:59:60Z",
                "Sat, 05 Jun 2016 15:10:09 GMT",
                "closed",
            ][rng.below(13)]
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
        "aws-health-reboot-maintenance-closed.json",
        "aws-health-documentation-sample.json",
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
                    // Only a continuation payload is refused this way, never an event.
                    EventError::Continuation { .. } => false,
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
