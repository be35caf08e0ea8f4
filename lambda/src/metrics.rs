//! CloudWatch metrics in the embedded metric format (EMF): one JSON log line per invocation,
//! which CloudWatch Logs turns into metrics without an API call or an agent.

use serde_json::{json, Map, Value};

use crate::handler::{InterruptionResult, StepError};

/// The default CloudWatch namespace (METRICS_NAMESPACE).
pub const DEFAULT_NAMESPACE: &str = "NodeTerminationHandler";

/// What one invocation did, in numbers.
#[derive(Debug, Default)]
pub struct Metrics {
    /// The interruption kind, or `skipped` for an event nth does not act on.
    pub kind: String,
    pub interruptions: u64,
    pub nodes_cordoned: u64,
    pub nodes_drained: u64,
    pub drains_incomplete: u64,
    pub pods_evicted: u64,
    pub pods_left: u64,
    pub drain_duration_ms: Vec<u64>,
    pub event_to_cordon_ms: Vec<u64>,
    pub lifecycle_completions: u64,
    pub errors: u64,
    /// Where the errors happened (`parse`, `resolve`, `node`, `drain`, `lifecycle`).
    pub error_stages: Vec<&'static str>,
    /// 1 when the configured webhook could not be set up in this container: notices are not
    /// sent, so an alarm on it tells the operator what logs alone would hide.
    pub webhook_unavailable: u64,
}

impl Metrics {
    pub fn from_results(
        kind: &str,
        results: &[InterruptionResult],
        failures: &[StepError],
    ) -> Self {
        let mut m = Self {
            kind: kind.to_owned(),
            interruptions: (results.len() + failures.len()) as u64,
            errors: failures.len() as u64,
            error_stages: failures.iter().map(|f| f.stage).collect(),
            ..Self::default()
        };
        for r in results {
            if let Some(ms) = r.cordoned_after_ms {
                m.nodes_cordoned += 1;
                m.event_to_cordon_ms.push(ms);
            }
            if let Some(report) = &r.drain {
                if report.complete {
                    m.nodes_drained += 1;
                } else {
                    m.drains_incomplete += 1;
                }
                m.pods_evicted += report.evicted.len() as u64;
                m.pods_left += report.left.len() as u64;
                m.drain_duration_ms.push(report.duration_ms);
            }
            if r.lifecycle.as_deref() == Some("completed") {
                m.lifecycle_completions += 1;
            }
        }
        m
    }

    /// An invocation that failed before any interruption was known (a malformed event).
    pub fn parse_error() -> Self {
        Self {
            kind: "unknown".to_owned(),
            errors: 1,
            error_stages: vec!["parse"],
            ..Self::default()
        }
    }

    /// The EMF document: metrics under the `Kind` dimension, and the error stages as a
    /// property that CloudWatch Logs Insights can group by.
    pub fn to_emf(&self, namespace: &str, timestamp_ms: i64) -> Value {
        let counts: [(&str, u64); 10] = [
            ("Interruptions", self.interruptions),
            ("NodesCordoned", self.nodes_cordoned),
            ("NodesDrained", self.nodes_drained),
            ("DrainsIncomplete", self.drains_incomplete),
            ("PodsEvicted", self.pods_evicted),
            ("PodsLeft", self.pods_left),
            ("LifecycleCompletions", self.lifecycle_completions),
            ("Errors", self.errors),
            ("WebhookUnavailable", self.webhook_unavailable),
            ("Invocations", 1),
        ];
        let mut definitions: Vec<Value> = counts
            .iter()
            .map(|(name, _)| json!({"Name": name, "Unit": "Count"}))
            .collect();
        let mut doc = Map::new();
        for (name, value) in counts {
            doc.insert(name.to_owned(), json!(value));
        }
        for (name, values) in [
            ("DrainDuration", &self.drain_duration_ms),
            ("EventToCordon", &self.event_to_cordon_ms),
        ] {
            // EMF takes an array of values; a metric with none is left out.
            if !values.is_empty() {
                definitions.push(json!({"Name": name, "Unit": "Milliseconds"}));
                doc.insert(name.to_owned(), json!(values));
            }
        }
        doc.insert("Kind".to_owned(), json!(self.kind));
        doc.insert("ErrorStages".to_owned(), json!(self.error_stages));
        doc.insert(
            "_aws".to_owned(),
            json!({
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [{
                    "Namespace": namespace,
                    "Dimensions": [["Kind"], []],
                    "Metrics": definitions,
                }],
            }),
        );
        Value::Object(doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emf_document_declares_every_metric_it_carries() {
        let m = Metrics {
            kind: "spot-interruption".into(),
            interruptions: 1,
            nodes_cordoned: 1,
            drain_duration_ms: vec![1200],
            event_to_cordon_ms: vec![350],
            ..Metrics::default()
        };
        let doc = m.to_emf("NTH", 1_700_000_000_000);
        let directive = &doc["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "NTH");
        for metric in directive["Metrics"].as_array().expect("metrics") {
            let name = metric["Name"].as_str().expect("name");
            assert!(doc.get(name).is_some(), "{name} declared but absent");
        }
        for dimension in directive["Dimensions"][0].as_array().expect("dimensions") {
            assert!(doc[dimension.as_str().expect("name")].is_string());
        }
        assert_eq!(doc["EventToCordon"], json!([350]));
    }

    #[test]
    fn metrics_without_values_are_not_declared() {
        let doc = Metrics::parse_error().to_emf("NTH", 0);
        let names: Vec<&str> = doc["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .expect("metrics")
            .iter()
            .filter_map(|m| m["Name"].as_str())
            .collect();
        assert!(!names.contains(&"DrainDuration"));
        assert_eq!(doc["Errors"], 1);
        assert_eq!(doc["ErrorStages"], json!(["parse"]));
    }
}
