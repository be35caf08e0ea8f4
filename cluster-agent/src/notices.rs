//! IMDS notices as core [`Interruption`]s. Each gets an id that is the same on every poll
//! that sees the notice, so that it is handled once and recognised on the node afterwards.

use chrono::{DateTime, NaiveDateTime, Utc};
use nth_core::{Interruption, InterruptionKind};
use serde::Deserialize;

pub const SPOT_PATH: &str = "/latest/meta-data/spot/instance-action";
pub const REBALANCE_PATH: &str = "/latest/meta-data/events/recommendations/rebalance";
pub const SCHEDULED_PATH: &str = "/latest/meta-data/events/maintenance/scheduled";
pub const TARGET_LIFECYCLE_PATH: &str = "/latest/meta-data/autoscaling/target-lifecycle-state";
pub const INSTANCE_ID_PATH: &str = "/latest/meta-data/instance-id";
pub const ZONE_PATH: &str = "/latest/meta-data/placement/availability-zone";

/// How IMDS writes maintenance dates: `21 Nov 2026 09:00:43 GMT`.
const SCHEDULED_DATE_FORMAT: &str = "%d %b %Y %H:%M:%S GMT";

/// The Auto Scaling target state that means the group is taking the instance away.
const ASG_TERMINATED: &str = "Terminated";

#[derive(Debug, thiserror::Error)]
pub enum NoticeError {
    #[error("{path}: {message}")]
    Malformed { path: &'static str, message: String },
}

fn malformed(path: &'static str, message: impl std::fmt::Display) -> NoticeError {
    NoticeError::Malformed {
        path,
        message: message.to_string(),
    }
}

#[derive(Deserialize)]
struct SpotAction {
    action: String,
    time: DateTime<Utc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rebalance {
    notice_time: DateTime<Utc>,
}

/// A maintenance event's state, as IMDS reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventState {
    Active,
    Canceled,
    Completed,
}

/// One entry of `events/maintenance/scheduled`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledEvent {
    pub id: String,
    pub code: String,
    pub state: EventState,
    pub not_before: DateTime<Utc>,
    pub description: String,
}

impl ScheduledEvent {
    pub fn interruption(&self, instance_id: &str, now: DateTime<Utc>) -> Interruption {
        Interruption {
            id: self.id.clone(),
            kind: InterruptionKind::ScheduledMaintenance,
            instance_id: instance_id.to_owned(),
            event_time: now,
            deadline: Some(self.not_before),
            detail: format!("{}: {}", self.code, self.description),
            lifecycle: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawScheduled {
    event_id: String,
    code: String,
    state: EventState,
    not_before: String,
    #[serde(default)]
    description: String,
}

/// `spot/instance-action`: the instance goes at `time`.
pub fn spot(
    body: &str,
    instance_id: &str,
    now: DateTime<Utc>,
) -> Result<Interruption, NoticeError> {
    let notice: SpotAction = serde_json::from_str(body).map_err(|e| malformed(SPOT_PATH, e))?;
    Ok(Interruption {
        id: format!("imds-spot-{instance_id}-{}", notice.time.timestamp()),
        kind: InterruptionKind::SpotInterruption,
        instance_id: instance_id.to_owned(),
        event_time: now,
        deadline: Some(notice.time),
        detail: notice.action,
        lifecycle: None,
    })
}

/// `events/recommendations/rebalance`: no end is given.
pub fn rebalance(body: &str, instance_id: &str) -> Result<Interruption, NoticeError> {
    let notice: Rebalance = serde_json::from_str(body).map_err(|e| malformed(REBALANCE_PATH, e))?;
    Ok(Interruption {
        id: format!(
            "imds-rebalance-{instance_id}-{}",
            notice.notice_time.timestamp()
        ),
        kind: InterruptionKind::RebalanceRecommendation,
        instance_id: instance_id.to_owned(),
        event_time: notice.notice_time,
        deadline: None,
        detail: "rebalance recommendation".into(),
        lifecycle: None,
    })
}

/// `events/maintenance/scheduled`: every event, whatever its state.
pub fn scheduled(body: &str) -> Result<Vec<ScheduledEvent>, NoticeError> {
    if body.trim().is_empty() {
        return Ok(Vec::new());
    }
    let raw: Vec<RawScheduled> =
        serde_json::from_str(body).map_err(|e| malformed(SCHEDULED_PATH, e))?;
    raw.into_iter()
        .map(|r| {
            let not_before = NaiveDateTime::parse_from_str(&r.not_before, SCHEDULED_DATE_FORMAT)
                .map_err(|e| {
                    malformed(SCHEDULED_PATH, format!("NotBefore {:?}: {e}", r.not_before))
                })?
                .and_utc();
            Ok(ScheduledEvent {
                id: r.event_id,
                code: r.code,
                state: r.state,
                not_before,
                description: r.description,
            })
        })
        .collect()
}

/// `autoscaling/target-lifecycle-state`: an interruption only once it reads `Terminated`.
pub fn asg_target_state(body: &str, instance_id: &str, now: DateTime<Utc>) -> Option<Interruption> {
    (body.trim() == ASG_TERMINATED).then(|| Interruption {
        // An instance is terminated by its group once: the instance id is the notice's identity.
        id: format!("imds-asg-terminated-{instance_id}"),
        kind: InterruptionKind::AsgTermination,
        instance_id: instance_id.to_owned(),
        event_time: now,
        deadline: None,
        detail: "Auto Scaling target lifecycle state Terminated".into(),
        lifecycle: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/events/imds")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn spot_sample_has_its_deadline_and_a_stable_id() {
        let now = Utc::now();
        let body = sample("spot-instance-action.json");
        let first = spot(&body, "i-1", now).expect("valid");
        let again = spot(&body, "i-1", now + chrono::TimeDelta::seconds(2)).expect("valid");
        assert_eq!(first.id, again.id);
        assert_eq!(first.kind, InterruptionKind::SpotInterruption);
        assert_eq!(
            first.deadline.map(|d| d.to_rfc3339()),
            Some("2026-11-02T14:07:03+00:00".into())
        );
        assert_eq!(first.detail, "terminate");
    }

    #[test]
    fn rebalance_sample_has_no_deadline() {
        let r = rebalance(&sample("rebalance-recommendation.json"), "i-1").expect("valid");
        assert_eq!(r.kind, InterruptionKind::RebalanceRecommendation);
        assert_eq!(r.deadline, None);
        assert!(r.id.starts_with("imds-rebalance-i-1-"));
    }

    #[test]
    fn scheduled_sample_parses_its_gmt_dates() {
        let events = scheduled(&sample("maintenance-scheduled.json")).expect("valid");
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!(e.id, "instance-event-0d59937288b749b32");
        assert_eq!(e.state, EventState::Active);
        assert_eq!(e.not_before.to_rfc3339(), "2026-11-21T09:00:43+00:00");
        let i = e.interruption("i-1", Utc::now());
        assert_eq!(i.id, e.id);
        assert_eq!(i.deadline, Some(e.not_before));
        assert!(scheduled("[]").expect("empty").is_empty());
        assert!(scheduled(
            r#"[{"EventId":"x","Code":"instance-stop","State":"active","NotBefore":"tomorrow"}]"#
        )
        .is_err());
    }

    #[test]
    fn single_digit_days_and_other_states_parse() {
        let body = r#"[{"EventId":"e","Code":"instance-stop","State":"canceled","NotBefore":"1 Dec 2026 09:00:43 GMT"}]"#;
        let e = &scheduled(body).expect("valid")[0];
        assert_eq!(e.state, EventState::Canceled);
        assert_eq!(e.not_before.to_rfc3339(), "2026-12-01T09:00:43+00:00");
    }

    #[test]
    fn only_terminated_is_an_asg_notice() {
        let now = Utc::now();
        let body = sample("autoscaling-target-lifecycle-state.txt");
        let i = asg_target_state(&body, "i-1", now).expect("terminated");
        assert_eq!(i.kind, InterruptionKind::AsgTermination);
        assert_eq!(i.lifecycle, None);
        assert!(asg_target_state("InService", "i-1", now).is_none());
    }
}
