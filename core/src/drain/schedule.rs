//! Which pod is evicted when. Ordinary pods first, as many at once as the concurrency
//! allows. A pod its budget refused waits holding no slot, so that free pods never queue
//! behind blocked ones, and is tried again as soon as its budget allows a disruption (the
//! budget watch), or after the fixed interval when no watch tells. System-critical pods
//! (DNS, networking) go once every ordinary pod is evicted or waiting on its budget, and in
//! any case early enough before the deadline for their own grace period.

use std::collections::VecDeque;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use serde::Serialize;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::budgets::{BudgetKey, Budgets};
use super::evict::{attempt, grace_seconds, own_grace, Attempt};
use super::{pod_ref, DrainDeadline, DrainSettings, PodNote, PodRef};

/// With a budget watch running, a refused pod is still tried again after this long without
/// news of its budget: a safety net for a change the watch missed, not the way pods move.
const BUDGET_SILENCE: Duration = Duration::from_secs(30);

/// A pod refused while its budget, as last seen, allowed a disruption is tried again this
/// soon: the allowance came while its request was in flight (the watch's news of it has
/// passed), or a concurrent eviction took it (the next refusal then waits for news).
const STALE_ALLOWANCE_RETRY: Duration = Duration::from_millis(250);

/// System-critical pods start at the latest this long before their own grace period would
/// have to begin to end by the deadline: time for the eviction request and the kubelet.
const CRITICAL_LEAD: chrono::TimeDelta = chrono::TimeDelta::seconds(5);

/// A grace period the drain shortened so that the pod stops before the instance goes.
#[derive(Debug, Clone, Serialize)]
pub struct GraceNote {
    pub pod: String,
    /// The pod's own (or the operator's override).
    pub own_seconds: i64,
    /// What the eviction asked for.
    pub asked_seconds: i64,
}

/// How the evictions ended.
#[derive(Debug, Default)]
pub(super) struct Outcomes {
    /// Accepted: wait for these to be gone.
    pub accepted: Vec<PodRef>,
    /// Gone before or during their eviction.
    pub gone: Vec<PodRef>,
    pub left: Vec<PodNote>,
    pub clipped: Vec<GraceNote>,
}

/// One pod to evict and what happened to it so far.
struct Entry {
    pod: Pod,
    id: PodRef,
    critical: bool,
    budget: Option<BudgetKey>,
    /// Refusals by its budget (429).
    refusals: u32,
    last_reason: Option<String>,
    /// The last retry was one for a stale allowance: the next refusal waits for news.
    stale_retried: bool,
}

/// Where a pod stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Place {
    /// Held back until critical pods may go.
    Held,
    Ready,
    InFlight,
    /// Refused; tried again when its budget allows, or at the instant.
    Waiting(Instant),
    Done,
}

pub(super) async fn evict_all(
    client: &Client,
    settings: &DrainSettings,
    ordinary: Vec<Pod>,
    critical: Vec<Pod>,
    deadline: DrainDeadline,
) -> Outcomes {
    let mut budgets = Budgets::watch(client).await;
    let entries: Vec<Entry> = ordinary
        .into_iter()
        .map(|p| (p, false))
        .chain(critical.into_iter().map(|p| (p, true)))
        .map(|(pod, critical)| Entry {
            id: pod_ref(&pod),
            budget: budgets.covering(&pod),
            pod,
            critical,
            refusals: 0,
            last_reason: None,
            stale_retried: false,
        })
        .collect();
    let mut run = Run {
        settings,
        places: entries
            .iter()
            .map(|e| {
                if e.critical {
                    Place::Held
                } else {
                    Place::Ready
                }
            })
            .collect(),
        queue: (0..entries.len())
            .filter(|i| !entries[*i].critical)
            .collect(),
        entries,
        outcomes: Outcomes::default(),
    };
    let critical_at = critical_release(&run.entries, settings, deadline);
    let give_up = instant_at(deadline.give_up_at);
    let mut in_flight = FuturesUnordered::new();
    loop {
        // Past the deadline nothing is tried again, but every pod gets its one try and every
        // request in flight its answer, as `kubectl drain` would.
        let expired = Instant::now() >= give_up;
        let now = Instant::now();
        if run.critical_held() && (run.ordinary_settled() || now >= critical_at || expired) {
            run.release_critical();
        }
        while in_flight.len() < settings.concurrency.max(1) {
            let Some(i) = run.queue.pop_front() else {
                break;
            };
            run.places[i] = Place::InFlight;
            let grace = grace_seconds(
                &run.entries[i].pod,
                settings.grace_period_override,
                deadline.pods_stopped_by,
                Utc::now(),
            );
            let client = client.clone();
            let id = run.entries[i].id.clone();
            in_flight.push(async move { (i, grace, attempt(&client, &id, grace).await) });
        }
        if in_flight.is_empty() && run.queue.is_empty() && (expired || run.all_done()) {
            break;
        }
        let next_retry = run.next_retry().filter(|_| !expired);
        tokio::select! {
            Some((i, grace, answer)) = in_flight.next(), if !in_flight.is_empty() => {
                run.answered(i, grace, answer, &mut budgets);
            }
            change = budgets.next_change(), if !expired => match change {
                Some(allowance) => run.wake(&allowance.key, allowance.allowed),
                None => run.budgets_unwatched(),
            },
            () = tokio::time::sleep_until(next_retry.unwrap_or(give_up)), if next_retry.is_some() => {
                run.due();
            }
            () = tokio::time::sleep_until(critical_at), if run.critical_held() && !expired => {}
            () = tokio::time::sleep_until(give_up), if !expired => {}
        }
    }
    run.finish(&budgets);
    run.outcomes
}

struct Run<'a> {
    settings: &'a DrainSettings,
    entries: Vec<Entry>,
    places: Vec<Place>,
    /// Ready pods, in the order they are tried.
    queue: VecDeque<usize>,
    outcomes: Outcomes,
}

impl Run<'_> {
    fn critical_held(&self) -> bool {
        self.places.contains(&Place::Held)
    }

    /// Whether no ordinary pod is ready or being evicted: each is evicted, gone, or
    /// waiting on its budget.
    fn ordinary_settled(&self) -> bool {
        !self
            .entries
            .iter()
            .zip(&self.places)
            .any(|(e, p)| !e.critical && matches!(p, Place::Ready | Place::InFlight))
    }

    fn release_critical(&mut self) {
        debug!("system-critical pods may go now");
        for (i, place) in self.places.iter_mut().enumerate() {
            if *place == Place::Held {
                *place = Place::Ready;
                self.queue.push_back(i);
            }
        }
    }

    fn all_done(&self) -> bool {
        self.places.iter().all(|p| *p == Place::Done)
    }

    fn next_retry(&self) -> Option<Instant> {
        self.places
            .iter()
            .filter_map(|p| match p {
                Place::Waiting(at) => Some(*at),
                _ => None,
            })
            .min()
    }

    fn answered(&mut self, i: usize, grace: Option<i64>, answer: Attempt, budgets: &mut Budgets) {
        let entry = &mut self.entries[i];
        match answer {
            Attempt::Accepted => {
                debug!(pod = %entry.id, grace_seconds = ?grace, "eviction accepted");
                if let Some(budget) = &entry.budget {
                    budgets.note_accepted(budget);
                }
                let own = own_grace(&entry.pod, self.settings.grace_period_override);
                if let Some(asked) = grace.filter(|g| *g < own) {
                    self.outcomes.clipped.push(GraceNote {
                        pod: entry.id.to_string(),
                        own_seconds: own,
                        asked_seconds: asked,
                    });
                }
                self.outcomes.accepted.push(entry.id.clone());
                self.places[i] = Place::Done;
            }
            Attempt::Gone => {
                self.outcomes.gone.push(entry.id.clone());
                self.places[i] = Place::Done;
            }
            Attempt::Failed(reason) => {
                self.outcomes.left.push(PodNote::new(&entry.id, reason));
                self.places[i] = Place::Done;
            }
            Attempt::Budget(reason) => {
                entry.refusals += 1;
                debug!(pod = %entry.id, %reason, refusals = entry.refusals, "eviction refused by its budget");
                entry.last_reason = Some(reason);
                // With a watch, the budget's next change wakes the pod; the timer is only a
                // safety net. Without one, the timer is all there is.
                // Evictions under the same budget still in flight may take what it allows.
                let budget = entry.budget.clone();
                let in_flight = budget.as_ref().map_or(0, |b| {
                    self.entries
                        .iter()
                        .zip(&self.places)
                        .enumerate()
                        .filter(|(j, (e, p))| {
                            *j != i && **p == Place::InFlight && e.budget.as_ref() == Some(b)
                        })
                        .count()
                });
                let entry = &mut self.entries[i];
                let stale = !entry.stale_retried
                    && budget.as_ref().is_some_and(|b| {
                        budgets.watching()
                            && usize::try_from(budgets.allowed(b)).unwrap_or(0) > in_flight
                    });
                entry.stale_retried = stale;
                let wait = match &entry.budget {
                    Some(_) if stale => STALE_ALLOWANCE_RETRY,
                    Some(_) if budgets.watching() => BUDGET_SILENCE,
                    _ => self.settings.eviction_retry_interval,
                };
                self.places[i] = Place::Waiting(Instant::now() + wait);
            }
            Attempt::Transient(reason) => {
                debug!(pod = %entry.id, %reason, "eviction failed; retrying");
                entry.last_reason = Some(reason);
                self.places[i] =
                    Place::Waiting(Instant::now() + self.settings.eviction_retry_interval);
            }
        }
    }

    /// The budget allows `allowed` disruptions: that many of the pods waiting on it, in the
    /// order they were refused, are tried at once.
    fn wake(&mut self, budget: &BudgetKey, allowed: i32) {
        let waiting = self
            .entries
            .iter()
            .enumerate()
            .filter(|(i, e)| {
                e.budget.as_ref() == Some(budget) && matches!(self.places[*i], Place::Waiting(_))
            })
            .map(|(i, _)| i)
            .take(usize::try_from(allowed).unwrap_or(0))
            .collect::<Vec<_>>();
        for i in waiting {
            self.places[i] = Place::Ready;
            self.queue.push_back(i);
        }
    }

    /// The budget watch ended: pods waiting on a budget go back to the fixed interval.
    fn budgets_unwatched(&mut self) {
        let soon = Instant::now() + self.settings.eviction_retry_interval;
        for place in &mut self.places {
            if let Place::Waiting(at) = place {
                *at = (*at).min(soon);
            }
        }
    }

    /// Pods whose retry time has come are tried again.
    fn due(&mut self) {
        let now = Instant::now();
        for i in 0..self.places.len() {
            if matches!(self.places[i], Place::Waiting(at) if at <= now) {
                self.places[i] = Place::Ready;
                self.queue.push_back(i);
            }
        }
    }

    /// The deadline came: every pod not evicted is left, with why.
    fn finish(&mut self, budgets: &Budgets) {
        for (entry, place) in self.entries.iter().zip(&self.places) {
            let note = match place {
                Place::Done => continue,
                Place::InFlight => PodNote::new(
                    &entry.id,
                    "eviction unanswered at the drain deadline".into(),
                ),
                Place::Held | Place::Ready if entry.last_reason.is_none() => {
                    PodNote::new(&entry.id, "not tried before the drain deadline".into())
                }
                _ => {
                    let reason = entry
                        .last_reason
                        .clone()
                        .unwrap_or_else(|| "refused until the drain deadline".into());
                    let mut note = PodNote::new(&entry.id, reason);
                    if entry.refusals > 0 {
                        note.refusals = Some(entry.refusals);
                        if let Some(budget) = &entry.budget {
                            note.budget = Some(format!("{}/{}", budget.0, budget.1));
                            note.budget_last_allowed = budgets.last_allowed(budget);
                        }
                    }
                    note
                }
            };
            warn!(pod = %note.pod, reason = %note.reason, refusals = ?note.refusals, budget = ?note.budget, "not evicted by the drain deadline");
            self.outcomes.left.push(note);
        }
    }
}

/// When system-critical pods go at the latest: early enough before the deadline for the
/// longest grace period among them.
fn critical_release(
    entries: &[Entry],
    settings: &DrainSettings,
    deadline: DrainDeadline,
) -> Instant {
    let longest = entries
        .iter()
        .filter(|e| e.critical)
        .map(|e| own_grace(&e.pod, settings.grace_period_override))
        .max()
        .unwrap_or(0);
    let end = deadline.pods_stopped_by.unwrap_or(deadline.give_up_at);
    instant_at(end - chrono::TimeDelta::seconds(longest) - CRITICAL_LEAD)
}

/// The tokio instant of a wall-clock time (now for a time past).
fn instant_at(at: DateTime<Utc>) -> Instant {
    Instant::now() + (at - Utc::now()).to_std().unwrap_or_default()
}
