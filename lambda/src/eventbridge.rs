//! EventBridge events in, normalised interruptions out.
//!
//! Parsing is lenient where AWS is (unknown fields ignored, optional fields optional) and
//! strict where acting on a wrong value would hurt: a known event missing what we need is an
//! error naming the field, so the invocation fails, is retried, and ends in the DLQ.

use aws_lambda_events::eventbridge::EventBridgeEvent;
use chrono::{DateTime, Utc};
use nth_core::{Interruption, InterruptionKind};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

/// EC2 reclaims a Spot instance two minutes after the interruption warning.
pub const SPOT_NOTICE: chrono::TimeDelta = chrono::TimeDelta::seconds(120);

const SPOT_INTERRUPTION: (&str, &str) = ("aws.ec2", "EC2 Spot Instance Interruption Warning");

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("not an EventBridge event: {path}: {message}")]
    Envelope { path: String, message: String },
    #[error("malformed {detail_type:?} event {event_id}: {path}: {message}")]
    Malformed {
        detail_type: String,
        event_id: String,
        path: String,
        message: String,
    },
}

/// What an event asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Interruptions(Vec<Interruption>),
    /// An event we do not act on, and why.
    Skipped(String),
}

#[derive(Debug, Deserialize)]
struct SpotDetail {
    #[serde(rename = "instance-id")]
    instance_id: String,
    #[serde(rename = "instance-action", default)]
    instance_action: Option<String>,
}

pub fn parse(event: &Value) -> Result<Parsed, EventError> {
    let envelope: EventBridgeEvent<Value> =
        serde_path_to_error::deserialize(event).map_err(|e| EventError::Envelope {
            path: e.path().to_string(),
            message: e.inner().to_string(),
        })?;
    let kind = (envelope.source.as_str(), envelope.detail_type.as_str());
    if kind == SPOT_INTERRUPTION {
        let ctx = Context::new(&envelope)?;
        let detail: SpotDetail = ctx.detail(&envelope.detail)?;
        let instance_id = ctx.instance_id(detail.instance_id, "detail.instance-id")?;
        return Ok(Parsed::Interruptions(vec![Interruption {
            id: ctx.id.clone(),
            kind: InterruptionKind::SpotInterruption,
            instance_id,
            event_time: ctx.time,
            deadline: Some(ctx.time + SPOT_NOTICE),
            detail: detail
                .instance_action
                .unwrap_or_else(|| "terminate".to_owned()),
        }]));
    }
    Ok(Parsed::Skipped(format!(
        "no handler for source {:?} detail-type {:?}",
        envelope.source, envelope.detail_type
    )))
}

/// The parts of the envelope every known event needs, with errors that name the event.
struct Context {
    detail_type: String,
    id: String,
    time: DateTime<Utc>,
}

impl Context {
    fn new(envelope: &EventBridgeEvent<Value>) -> Result<Self, EventError> {
        let detail_type = envelope.detail_type.clone();
        let missing = |field: &str| EventError::Malformed {
            detail_type: detail_type.clone(),
            event_id: envelope.id.clone().unwrap_or_else(|| "(no id)".into()),
            path: field.to_owned(),
            message: "missing field".to_owned(),
        };
        let id = envelope
            .id
            .clone()
            .filter(|id| !id.is_empty())
            .ok_or_else(|| missing("id"))?;
        let time = envelope.time.ok_or_else(|| missing("time"))?;
        Ok(Self {
            detail_type,
            id,
            time,
        })
    }

    fn malformed(&self, path: String, message: String) -> EventError {
        EventError::Malformed {
            detail_type: self.detail_type.clone(),
            event_id: self.id.clone(),
            path,
            message,
        }
    }

    fn detail<T: DeserializeOwned>(&self, detail: &Value) -> Result<T, EventError> {
        serde_path_to_error::deserialize(detail).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." {
                "detail".to_owned()
            } else {
                format!("detail.{path}")
            };
            self.malformed(path, e.inner().to_string())
        })
    }

    fn instance_id(&self, id: String, field: &str) -> Result<String, EventError> {
        if id.starts_with("i-")
            && id.len() > 2
            && id[2..].chars().all(|c| c.is_ascii_alphanumeric())
        {
            Ok(id)
        } else {
            Err(self.malformed(
                field.to_owned(),
                format!("expected an EC2 instance id (i-...), got {id:?}"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spot(detail: Value) -> Value {
        json!({
            "version": "0",
            "id": "1e5527d7-bb36-4607-3370-4164db56a40e",
            "detail-type": "EC2 Spot Instance Interruption Warning",
            "source": "aws.ec2",
            "account": "123456789012",
            "time": "2026-11-02T14:05:03Z",
            "region": "us-east-1",
            "resources": ["arn:aws:ec2:us-east-1:123456789012:instance/i-0b662ef9931388ba0"],
            "detail": detail,
        })
    }

    #[test]
    fn spot_warning_becomes_an_interruption_with_a_two_minute_deadline() {
        let parsed = parse(&spot(
            json!({"instance-id": "i-0b662ef9931388ba0", "instance-action": "stop"}),
        ))
        .expect("valid event");
        let Parsed::Interruptions(list) = parsed else {
            panic!("expected interruptions, got {parsed:?}")
        };
        assert_eq!(list.len(), 1);
        let i = &list[0];
        assert_eq!(i.instance_id, "i-0b662ef9931388ba0");
        assert_eq!(i.kind, InterruptionKind::SpotInterruption);
        assert_eq!(i.detail, "stop");
        assert_eq!(
            i.deadline.map(|d| d.to_rfc3339()),
            Some("2026-11-02T14:07:03+00:00".to_owned())
        );
    }

    #[test]
    fn extra_fields_and_fractional_times_are_accepted() {
        let mut event = spot(
            json!({"instance-id": "i-0b662ef9931388ba0", "instance-action": "terminate", "new-field": 1}),
        );
        event["time"] = json!("2026-11-02T14:05:03.123Z");
        event["replay-name"] = json!("x");
        assert!(matches!(parse(&event), Ok(Parsed::Interruptions(_))));
    }

    #[test]
    fn missing_instance_id_names_the_field() {
        let err = parse(&spot(json!({"instance-action": "terminate"}))).expect_err("must fail");
        let message = err.to_string();
        assert!(message.contains("instance-id"), "{message}");
        assert!(message.contains("1e5527d7"), "{message}");
    }

    #[test]
    fn wrong_type_and_bad_instance_id_name_the_field() {
        let err = parse(&spot(json!({"instance-id": 42}))).expect_err("must fail");
        assert!(err.to_string().contains("detail.instance-id"), "{err}");
        let err = parse(&spot(json!({"instance-id": "sir-123"}))).expect_err("must fail");
        assert!(err.to_string().contains("detail.instance-id"), "{err}");
    }

    #[test]
    fn missing_time_is_an_error_not_a_guess() {
        let mut event = spot(json!({"instance-id": "i-0b662ef9931388ba0"}));
        event.as_object_mut().map(|o| o.remove("time"));
        let err = parse(&event).expect_err("must fail");
        assert!(err.to_string().contains("time"), "{err}");
    }

    #[test]
    fn unknown_detail_types_are_skipped() {
        let event = json!({"id": "x", "source": "aws.ec2", "detail-type": "EC2 AMI State Change", "detail": {}});
        assert!(matches!(parse(&event), Ok(Parsed::Skipped(_))));
    }

    #[test]
    fn non_eventbridge_input_names_the_missing_envelope_field() {
        let err = parse(&json!({"hello": "world"})).expect_err("must fail");
        assert!(err.to_string().contains("detail-type"), "{err}");
    }
}
