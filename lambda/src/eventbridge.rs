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
use tracing::warn;

/// EC2 reclaims a Spot instance two minutes after the interruption warning; a capacity
/// reservation's instances get the same two-minute notice.
pub const SPOT_NOTICE: TimeDelta = TimeDelta::seconds(120);

/// EC2 does not wait for a stopping instance's pods. This bounds how long a drain chases
/// them (and clips their grace periods) once the instance has started to go.
pub const STOPPING_NOTICE: TimeDelta = TimeDelta::seconds(60);

/// How far ahead of this function's clock an event's `time` may be. EventBridge stamps events
/// with AWS's clock and Lambda's is synchronised to it, so real events are at most seconds
/// ahead; a day's margin leaves room for any clock trouble, and an event from further ahead
/// is forged or corrupt: it is refused, not acted on with a deadline nobody can meet or check.
pub const MAX_FUTURE_SKEW: TimeDelta = TimeDelta::days(1);

/// No EC2, Auto Scaling or Health event predates EC2's public launch (2006-08-25T00:00:00Z,
/// as a Unix time): an earlier `time` is corrupt. The floor is fixed rather than "a year
/// ago": old events are legitimately redelivered (dead-letter redrive, archive replay), the
/// drain already ignores a deadline in the past, and a floor that moved with the clock would
/// make every stored sample malformed in time.
pub const EARLIEST_EVENT_SECONDS: i64 = 1_156_464_000;

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
    /// A drain continuation (see `continuation`) that no invocation of this function sends.
    #[error("refused continuation for instance {instance_id}: {path}: {message}")]
    Continuation {
        instance_id: String,
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

/// An AWS Health event's detail. Only `service` and `eventTypeCategory` are required; the
/// times and entities are read leniently (any JSON), since a bad one only costs a deadline
/// or one instance, never the event's other instances.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HealthDetail {
    service: String,
    event_type_category: String,
    #[serde(default)]
    event_arn: Option<String>,
    #[serde(default)]
    event_type_code: Option<String>,
    /// `upcoming`, `open` or `closed`; absent in older samples, which are read as open.
    #[serde(default)]
    status_code: Option<String>,
    #[serde(default)]
    start_time: Option<Value>,
    #[serde(default)]
    affected_entities: Option<Value>,
}

/// Health event types whose closing means the instance rebooted (or was spared the reboot)
/// and stays: its node, cordoned for the maintenance, is given back. A closed retirement or
/// stop leaves nothing to give back (the instance is gone or stopped).
const REBOOT_MAINTENANCE: [&str; 2] = [
    "AWS_EC2_SYSTEM_REBOOT_MAINTENANCE_SCHEDULED",
    "AWS_EC2_INSTANCE_REBOOT_MAINTENANCE_SCHEDULED",
];

/// A Health time that could not be read: the interruption goes on without a deadline.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum HealthTimeError {
    #[error("{field}: empty")]
    Empty { field: &'static str },
    #[error("{field}: {value:?} is not an {format} time (like {example:?}): {message}")]
    Unreadable {
        field: &'static str,
        value: String,
        format: &'static str,
        example: &'static str,
        message: String,
    },
    #[error("{field}: {kind}, not a string")]
    NotAString {
        field: &'static str,
        kind: &'static str,
    },
}

/// Reads a Health time: RFC 2822, as AWS Health writes them (`Mon, 02 Nov 2026 06:02:51
/// GMT`), or RFC 3339. The weekday is ignored: AWS's own documented sample says `Sat, 05 Jun
/// 2016` of a Sunday, and the date alone says when. Which format is tried follows the
/// value's shape (RFC 3339 starts with a year and a dash), so an error quotes the format
/// that was meant.
fn health_time(field: &'static str, value: &Value) -> Result<DateTime<Utc>, HealthTimeError> {
    let Some(text) = value.as_str() else {
        return Err(HealthTimeError::NotAString {
            field,
            kind: json_kind(value),
        });
    };
    let text = text.trim();
    if text.is_empty() {
        return Err(HealthTimeError::Empty { field });
    }
    let unreadable = |format, example, message: String| HealthTimeError::Unreadable {
        field,
        value: text.to_owned(),
        format,
        example,
        message,
    };
    // `2026-11-02T...` (a year, then a dash) against `05 Jun 2016 ...` or `Sat, ...`.
    let rfc3339_shaped = text
        .trim_start_matches(['+', '-'])
        .trim_start_matches(|c: char| c.is_ascii_digit())
        .starts_with('-');
    let parsed = if rfc3339_shaped {
        DateTime::parse_from_rfc3339(text)
            .map_err(|e| unreadable("RFC 3339", "2026-11-02T06:02:51Z", e.to_string()))
    } else {
        let without_weekday = match text.split_once(',') {
            Some((weekday, rest)) if weekday.chars().all(|c| c.is_ascii_alphabetic()) => {
                rest.trim_start()
            }
            _ => text,
        };
        DateTime::parse_from_rfc2822(without_weekday)
            .map_err(|e| unreadable("RFC 2822", "Mon, 02 Nov 2026 06:02:51 GMT", e.to_string()))
    }?;
    Ok(parsed.with_timezone(&Utc))
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
        let context = Self {
            detail_type,
            id,
            time,
        };
        context.check_time(Utc::now())?;
        Ok(context)
    }

    /// The event's `time` lies where a real event's can: not before EC2 existed, not
    /// further ahead of this function's clock than MAX_FUTURE_SKEW. Everything computed from
    /// it (deadlines) then stays far inside chrono's range.
    fn check_time(&self, now: DateTime<Utc>) -> Result<(), EventError> {
        let time = self.time;
        if time.timestamp() < EARLIEST_EVENT_SECONDS {
            return Err(self.malformed(
                "time",
                format!(
                    "{} is before EC2 existed ({})",
                    time.to_rfc3339(),
                    DateTime::from_timestamp(EARLIEST_EVENT_SECONDS, 0)
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_default()
                ),
            ));
        }
        let ahead = time.signed_duration_since(now);
        if ahead > MAX_FUTURE_SKEW {
            return Err(self.malformed(
                "time",
                format!(
                    "{} is more than {} hours ahead of this function's clock ({})",
                    time.to_rfc3339(),
                    MAX_FUTURE_SKEW.num_hours(),
                    now.to_rfc3339()
                ),
            ));
        }
        Ok(())
    }

    /// The event's time plus a notice period; checked although the time's window keeps it
    /// in range, so that no input reaches unchecked arithmetic.
    fn after(&self, notice: TimeDelta) -> Result<DateTime<Utc>, EventError> {
        self.time.checked_add_signed(notice).ok_or_else(|| {
            self.malformed(
                "time",
                format!(
                    "{} plus {} s is beyond the last representable time",
                    self.time.to_rfc3339(),
                    notice.num_seconds()
                ),
            )
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
            deadline: notice.map(|n| self.after(n)).transpose()?,
            detail,
            lifecycle: None,
        }]))
    }

    /// AWS Health: only EC2's scheduled changes; one interruption per affected instance,
    /// each with its own id so that one instance's record never shadows another's.
    ///
    /// A Health event is a lifecycle: published `upcoming`, then `open`, maybe updated, then
    /// `closed`, each time under a new EventBridge id but with one `eventArn`. Ids are built
    /// from the ARN, so every publication is the same interruption to the node's marks and a
    /// node is drained once; a closed reboot maintenance gives its nodes back.
    fn health(&self, envelope: &EventBridgeEvent<Value>) -> Result<Parsed, EventError> {
        let d: HealthDetail = self.detail(&envelope.detail)?;
        if d.service != "EC2" || d.event_type_category != "scheduledChange" {
            return Ok(Parsed::Skipped(format!(
                "AWS Health {} {} event: only EC2 scheduledChange is handled",
                d.service, d.event_type_category
            )));
        }
        let code = d.event_type_code.clone().unwrap_or_default();
        let kind = match d.status_code.as_deref() {
            None | Some("upcoming" | "open") => InterruptionKind::ScheduledMaintenance,
            Some("closed") if REBOOT_MAINTENANCE.contains(&code.as_str()) => {
                InterruptionKind::MaintenanceClosed
            }
            Some("closed") => {
                return Ok(Parsed::Skipped(format!(
                    "AWS Health {code} event is closed: only a closed reboot maintenance \
                     gives nodes back, and nothing is drained after the fact"
                )))
            }
            Some(other) => {
                return Ok(Parsed::Skipped(format!(
                    "AWS Health {code} event has statusCode {other:?}: only upcoming, open \
                     and closed are known"
                )))
            }
        };
        // The maintenance's start only refines the drain's deadline: unreadable, the drain
        // goes on without one, for every instance, rather than not at all.
        let deadline = match (kind, &d.start_time) {
            (InterruptionKind::ScheduledMaintenance, Some(start)) => {
                match health_time("detail.startTime", start) {
                    Ok(start) => Some(start),
                    Err(error) => {
                        warn!(event_id = %self.id, %error, "AWS Health event: no deadline known");
                        None
                    }
                }
            }
            _ => None,
        };
        let instances = self.health_instances(&d, envelope);
        if instances.is_empty() {
            return Ok(Parsed::Skipped(
                "AWS Health event names no EC2 instance".to_owned(),
            ));
        }
        let identity = d
            .event_arn
            .as_deref()
            .filter(|arn| !arn.is_empty())
            .unwrap_or(&self.id);
        let detail = if kind == InterruptionKind::MaintenanceClosed {
            format!("{code} closed")
        } else {
            code
        };
        Ok(Parsed::Interruptions(
            instances
                .into_iter()
                .map(|instance_id| Interruption {
                    id: format!("{identity}-{instance_id}"),
                    kind,
                    instance_id,
                    event_time: self.time,
                    deadline,
                    detail: detail.clone(),
                    lifecycle: None,
                })
                .collect(),
        ))
    }

    /// The EC2 instances a Health event names: its affected entities, or its resources when
    /// it lists no entities. An entity that is not an instance (an account, a volume) is
    /// not ours; one that cannot be read is logged and skipped, never failing the others.
    fn health_instances(
        &self,
        d: &HealthDetail,
        envelope: &EventBridgeEvent<Value>,
    ) -> Vec<String> {
        let mut instances: Vec<String> = match &d.affected_entities {
            Some(Value::Array(entities)) => {
                let (readable, unreadable): (Vec<_>, Vec<_>) = entities
                    .iter()
                    .enumerate()
                    .map(|(n, e)| (n, e.get("entityValue").and_then(Value::as_str)))
                    .partition(|(_, value)| value.is_some());
                // One line for all of them: a payload of many bad entities costs one log line.
                if let Some((first, _)) = unreadable.first() {
                    warn!(
                        event_id = %self.id,
                        skipped = unreadable.len(),
                        "detail.affectedEntities[{first}] and any others skipped have no entityValue string"
                    );
                }
                readable
                    .into_iter()
                    .filter_map(|(_, value)| value.map(str::to_owned))
                    .collect()
            }
            None | Some(Value::Null) => envelope.resources.clone().unwrap_or_default(),
            Some(other) => {
                warn!(
                    event_id = %self.id,
                    kind = %json_kind(other),
                    "detail.affectedEntities is not a list; using the event's resources"
                );
                envelope.resources.clone().unwrap_or_default()
            }
        };
        // An instance named twice is one interruption: two would drain its node side by side.
        let mut seen = std::collections::HashSet::new();
        instances.retain(|i| is_instance_id(i) && seen.insert(i.clone()));
        instances
    }
}

/// What sort of JSON value `v` is, for a log line that must not copy a payload's bulk.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn is_instance_id(id: &str) -> bool {
    id.strip_prefix("i-").is_some_and(|rest| {
        !rest.is_empty() && rest.len() <= 32 && rest.chars().all(|c| c.is_ascii_alphanumeric())
    })
}

#[cfg(test)]
mod tests;
