//! Fuzzes EventBridge event parsing and normalisation: any bytes that are JSON go through
//! `eventbridge::parse` and `handler::explain` (parse, then the default policy's plan), and
//! `Continuation::from_payload`, which reads the payload a drain sends itself.
//!
//! Properties, the same as the property test in lambda/src/eventbridge/tests.rs:
//! nothing panics, and every error names the field that is wrong.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use nth_core::Policy;
use nth_lambda::continuation::Continuation;
use nth_lambda::eventbridge::{parse, EventError, Parsed};
use nth_lambda::handler::explain;
use serde_json::Value;

static POLICY: LazyLock<Policy> = LazyLock::new(Policy::default);

/// The property test's rule: an envelope error has a path, and a known event's error is
/// about its id, its time or something under detail. The message shows that path.
fn check_error(error: &EventError, input: &Value) {
    let message = error.to_string();
    assert!(!message.is_empty(), "empty error message for {input}");
    let (path, names_a_field) = match error {
        EventError::Envelope { path, .. } => (path, !path.is_empty()),
        EventError::Malformed { path, .. } => (
            path,
            path == "id" || path == "time" || path.starts_with("detail"),
        ),
        EventError::Continuation { path, .. } => (path, path.starts_with("nth-continuation.")),
    };
    assert!(names_a_field, "error names no field: {message}");
    assert!(
        message.contains(path.as_str()),
        "error message does not show its path {path:?}: {message}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(event) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let parsed = parse(&event);
    match &parsed {
        Ok(Parsed::Interruptions(list)) => {
            assert!(!list.is_empty(), "no interruptions and no skip reason");
            for i in list {
                assert!(i.instance_id.starts_with("i-"), "{:?}", i.instance_id);
            }
        }
        Ok(Parsed::Skipped(reason)) => assert!(!reason.is_empty(), "skip without a reason"),
        Err(error) => check_error(error, &event),
    }
    match explain(&event, &POLICY) {
        Ok(plan) => {
            assert!(parsed.is_ok(), "explain planned what parse rejected");
            assert!(plan["interruptions"].is_array(), "{plan}");
        }
        Err(error) => {
            assert!(parsed.is_err(), "explain failed where parse did not");
            check_error(&error, &event);
        }
    }
    match Continuation::from_payload(&event) {
        Ok(Some(c)) => assert!(
            (2..=nth_lambda::continuation::MAX_ROUNDS).contains(&c.round),
            "round {} accepted",
            c.round
        ),
        Ok(None) => {}
        Err(error) => check_error(&error, &event),
    }
});
