//! EventBridge events in, normalised interruptions out.
//!
//! Parsing is lenient where AWS is (unknown fields ignored, optional fields optional) and
//! strict where acting on a wrong value would hurt: a known event missing what we need is an
//! error naming the field, so the invocation fails, is retried, and ends in the DLQ.

use aws_lambda_events::eventbridge::EventBridgeEvent;
use chrono::{DateTime, TimeDelta, Utc};
use nth_core::{Interruption, InterruptionKind, LifecycleAction};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

/// EC2 reclaims a Spot instance two minutes after the interruption warning; a capacity
/// reservation's instances get the same two-minute notice.
pub const SPOT_NOTICE: TimeDelta = TimeDelta::seconds(120);

/// EC2 does not wait for a stopping instance's pods. This bounds how long a drain chases
/// them (and clips their grace periods) once the instance has started to go.
pub const STOPPING_NOTICE: TimeDelta = TimeDelta::seconds(60);

const EC2: &str = "aws.ec2";
const AUTOSCALING: &str = "aws.autoscaling";
const HEALTH: &str = "aws.health";

const SPOT_WARNING: &str = "EC2 Spot Instance Interruption Warning";
const REBALANCE: &str = "EC2 Instance Rebalance Recommendation";
const STATE_CHANGE: &str = "EC2 Instance State-change Notification";
const CAPACITY_RESERVATION: &str = "EC2 Capacity Reservation Instance Interruption Warning";
const TERMINATE_LIFECYCLE: &str = "EC2 Instance-terminate Lifecycle Action";
const LAUNCH_LIFECYCLE: &str = "EC2 Instance-launch Lifecycle Action";
const HEALTH_EVENT: &str = "AWS Health Event";

/// Sent when a lifecycle hook is created or changed; it names no instance.
const TEST_NOTIFICATION: &str = "autoscaling:TEST_NOTIFICATION";

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
struct InstanceDetail {
    #[serde(rename = "instance-id")]
    instance_id: String,
    #[serde(rename = "instance-action", default)]
    instance_action: Option<String>,
}

#[derive(Debug, Deserialize)]
struct StateChangeDetail {
    #[serde(rename = "instance-id")]
    instance_id: String,
    state: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LifecycleDetail {
    lifecycle_action_token: String,
    auto_scaling_group_name: String,
    lifecycle_hook_name: String,
    #[serde(rename = "EC2InstanceId")]
    ec2_instance_id: String,
    lifecycle_transition: String,
    #[serde(default)]
    destination: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HealthDetail {
    service: String,
    event_type_category: String,
    #[serde(default)]
    event_type_code: Option<String>,
    #[serde(default)]
    start_time: Option<String>,
    #[serde(default)]
    affected_entities: Option<Vec<HealthEntity>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HealthEntity {
    entity_value: String,
}

pub fn parse(event: &Value) -> Result<Parsed, EventError> {
    let envelope: EventBridgeEvent<Value> =
        serde_path_to_error::deserialize(event).map_err(|e| EventError::Envelope {
            path: e.path().to_string(),
            message: e.inner().to_string(),
        })?;
    let source = envelope.source.as_str();
    let detail_type = envelope.detail_type.as_str();
    let known = matches!(
        (source, detail_type),
        (
            EC2,
            SPOT_WARNING | REBALANCE | STATE_CHANGE | CAPACITY_RESERVATION
        ) | (AUTOSCALING, TERMINATE_LIFECYCLE | LAUNCH_LIFECYCLE)
            | (HEALTH, HEALTH_EVENT)
    );
    if !known {
        return Ok(Parsed::Skipped(format!(
            "no handler for source {source:?} detail-type {detail_type:?}"
        )));
    }
    let ctx = Context::new(&envelope)?;
    let detail = &envelope.detail;
    match detail_type {
        SPOT_WARNING | CAPACITY_RESERVATION => {
            let d: InstanceDetail = ctx.detail(detail)?;
            let kind = if detail_type == SPOT_WARNING {
                InterruptionKind::SpotInterruption
            } else {
                InterruptionKind::CapacityReservationInterruption
            };
            let action = d.instance_action.unwrap_or_else(|| "terminate".to_owned());
            ctx.one(
                kind,
                d.instance_id,
                "detail.instance-id",
                Some(SPOT_NOTICE),
                action,
            )
        }
        REBALANCE => {
            let d: InstanceDetail = ctx.detail(detail)?;
            ctx.one(
                InterruptionKind::RebalanceRecommendation,
                d.instance_id,
                "detail.instance-id",
                None,
                "rebalance recommended".to_owned(),
            )
        }
        STATE_CHANGE => {
            let d: StateChangeDetail = ctx.detail(detail)?;
            let (kind, notice) = match d.state.as_str() {
                "stopping" | "stopped" | "shutting-down" | "terminated" => {
                    (InterruptionKind::InstanceStopping, Some(STOPPING_NOTICE))
                }
                "running" => (InterruptionKind::InstanceRunning, None),
                other => {
                    return Ok(Parsed::Skipped(format!(
                        "instance {} is {other}: nothing to do",
                        d.instance_id
                    )))
                }
            };
            ctx.one(kind, d.instance_id, "detail.instance-id", notice, d.state)
        }
        TERMINATE_LIFECYCLE | LAUNCH_LIFECYCLE => {
            let is_test = ["LifecycleTransition", "Event"]
                .iter()
                .any(|k| detail.get(k).and_then(Value::as_str) == Some(TEST_NOTIFICATION));
            if is_test {
                return Ok(Parsed::Skipped(format!(
                    "{TEST_NOTIFICATION}: nothing to do"
                )));
            }
            let d: LifecycleDetail = ctx.detail(detail)?;
            let kind = if detail_type == TERMINATE_LIFECYCLE {
                InterruptionKind::AsgTermination
            } else {
                InterruptionKind::AsgLaunch
            };
            let mut parsed = ctx.one(
                kind,
                d.ec2_instance_id,
                "detail.EC2InstanceId",
                None,
                d.destination.map_or_else(
                    || d.lifecycle_transition.clone(),
                    |to| format!("{} to {to}", d.lifecycle_transition),
                ),
            )?;
            if let Parsed::Interruptions(list) = &mut parsed {
                for i in list {
                    i.lifecycle = Some(LifecycleAction {
                        group: d.auto_scaling_group_name.clone(),
                        hook: d.lifecycle_hook_name.clone(),
                        token: d.lifecycle_action_token.clone(),
                        transition: d.lifecycle_transition.clone(),
                    });
                }
            }
            Ok(parsed)
        }
        _ => ctx.health(&envelope),
    }
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

    fn malformed(&self, path: &str, message: String) -> EventError {
        EventError::Malformed {
            detail_type: self.detail_type.clone(),
            event_id: self.id.clone(),
            path: path.to_owned(),
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
            self.malformed(&path, e.inner().to_string())
        })
    }

    fn instance_id(&self, id: String, field: &str) -> Result<String, EventError> {
        if is_instance_id(&id) {
            Ok(id)
        } else {
            Err(self.malformed(
                field,
                format!("expected an EC2 instance id (i-...), got {id:?}"),
            ))
        }
    }

    fn one(
        &self,
        kind: InterruptionKind,
        instance_id: String,
        field: &str,
        notice: Option<TimeDelta>,
        detail: String,
    ) -> Result<Parsed, EventError> {
        Ok(Parsed::Interruptions(vec![Interruption {
            id: self.id.clone(),
            kind,
            instance_id: self.instance_id(instance_id, field)?,
            event_time: self.time,
            deadline: notice.map(|n| self.time + n),
            detail,
            lifecycle: None,
        }]))
    }

    /// AWS Health: only EC2's scheduled changes; one interruption per affected instance,
    /// each with its own id so that one instance's record never shadows another's.
    fn health(&self, envelope: &EventBridgeEvent<Value>) -> Result<Parsed, EventError> {
        let d: HealthDetail = self.detail(&envelope.detail)?;
        if d.service != "EC2" || d.event_type_category != "scheduledChange" {
            return Ok(Parsed::Skipped(format!(
                "AWS Health {} {} event: only EC2 scheduledChange is handled",
                d.service, d.event_type_category
            )));
        }
        let start = d
            .start_time
            .as_deref()
            .map(|t| {
                DateTime::parse_from_rfc2822(t)
                    .or_else(|_| DateTime::parse_from_rfc3339(t))
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| {
                        self.malformed(
                            "detail.startTime",
                            format!("{t:?} is not an RFC 2822 time: {e}"),
                        )
                    })
            })
            .transpose()?;
        let mut instances: Vec<String> = match &d.affected_entities {
            Some(entities) => entities.iter().map(|e| e.entity_value.clone()).collect(),
            None => envelope.resources.clone().unwrap_or_default(),
        };
        // An instance named twice is one interruption: two would drain its node side by side.
        let mut seen = std::collections::HashSet::new();
        instances.retain(|i| is_instance_id(i) && seen.insert(i.clone()));
        if instances.is_empty() {
            return Ok(Parsed::Skipped(
                "AWS Health event names no EC2 instance".to_owned(),
            ));
        }
        let code = d.event_type_code.unwrap_or_default();
        Ok(Parsed::Interruptions(
            instances
                .into_iter()
                .map(|instance_id| Interruption {
                    id: format!("{}-{instance_id}", self.id),
                    kind: InterruptionKind::ScheduledMaintenance,
                    instance_id,
                    event_time: self.time,
                    deadline: start,
                    detail: code.clone(),
                    lifecycle: None,
                })
                .collect(),
        ))
    }
}

fn is_instance_id(id: &str) -> bool {
    id.strip_prefix("i-").is_some_and(|rest| {
        !rest.is_empty() && rest.len() <= 32 && rest.chars().all(|c| c.is_ascii_alphanumeric())
    })
}

#[cfg(test)]
mod tests;
