//! Liveness and readiness, shared by the loops that report it and the ops
//! endpoints and systemd watchdog that read it.
//!
//! - Alive: no loop has been busy in one step for longer than the stall
//!   limit (a wedged loop), and no loop has exited unexpectedly. Waiting
//!   (between polls, for new records, in a retry backoff) is not a stall.
//! - Ready: every enabled stream completed a poll, or stored a page of a
//!   poll still under way (a long backfill), within 3 × its interval, and
//!   none of them last failed on a rejected token.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// A loop busy in one step for longer than this is wedged.
pub const STALL_LIMIT: Duration = Duration::from_secs(600);

#[derive(Debug, Default)]
struct LoopState {
    busy_since: Option<Instant>,
    exited: bool,
}

#[derive(Debug)]
struct StreamState {
    interval: Duration,
    last_success: Option<Instant>,
    /// A page of the poll under way was stored (cleared when a poll fails).
    last_progress: Option<Instant>,
    last_error: Option<String>,
    auth_failed: bool,
}

#[derive(Debug, Default)]
pub struct Health {
    loops: Mutex<BTreeMap<String, LoopState>>,
    streams: Mutex<BTreeMap<String, StreamState>>,
    /// Sinks whose receiver refuses their credentials, with the reply.
    refused_sinks: Mutex<BTreeMap<String, String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Health {
    /// The process's health state.
    pub fn get() -> &'static Health {
        static H: OnceLock<Health> = OnceLock::new();
        H.get_or_init(Health::default)
    }

    pub fn register_stream(&self, name: &str, interval: Duration) {
        lock(&self.streams).insert(
            name.to_string(),
            StreamState { interval, last_success: None, last_progress: None, last_error: None, auth_failed: false },
        );
    }

    /// A loop starts (or makes progress in) a step.
    pub fn busy(&self, name: &str) {
        lock(&self.loops).entry(name.to_string()).or_default().busy_since = Some(Instant::now());
    }

    /// A loop waits (between steps).
    pub fn idle(&self, name: &str) {
        lock(&self.loops).entry(name.to_string()).or_default().busy_since = None;
    }

    /// A loop ended (it should not, before shutdown).
    pub fn exited(&self, name: &str) {
        lock(&self.loops).entry(name.to_string()).or_default().exited = true;
    }

    pub fn poll_ok(&self, stream: &str) {
        if let Some(s) = lock(&self.streams).get_mut(stream) {
            s.last_success = Some(Instant::now());
            s.last_error = None;
            s.auth_failed = false;
        }
    }

    /// A page of the poll under way was stored.
    pub fn poll_progress(&self, stream: &str) {
        if let Some(s) = lock(&self.streams).get_mut(stream) {
            s.last_progress = Some(Instant::now());
        }
    }

    pub fn poll_failed(&self, stream: &str, error: &str, auth: bool) {
        if let Some(s) = lock(&self.streams).get_mut(stream) {
            s.last_progress = None;
            s.last_error = Some(error.to_string());
            s.auth_failed = auth;
        }
    }

    /// A sink's receiver refused its credentials (401/403).
    pub fn sink_credentials_refused(&self, sink: &str, reason: &str) {
        lock(&self.refused_sinks).insert(sink.to_string(), reason.to_string());
    }

    /// A sink delivered: whatever was refused before is accepted now.
    pub fn sink_ok(&self, sink: &str) {
        lock(&self.refused_sinks).remove(sink);
    }

    /// `Ok` while alive, else what is wrong.
    pub fn alive(&self) -> Result<(), Vec<String>> {
        let now = Instant::now();
        let problems: Vec<String> = lock(&self.loops)
            .iter()
            .filter_map(|(name, l)| {
                if l.exited {
                    Some(format!("{name} stopped"))
                } else {
                    l.busy_since
                        .filter(|t| now.duration_since(*t) > STALL_LIMIT)
                        .map(|t| format!("{name} stuck for {}s", now.duration_since(t).as_secs()))
                }
            })
            .collect();
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }

    /// `Ok` when ready, else the reasons.
    pub fn ready(&self) -> Result<(), Vec<String>> {
        let now = Instant::now();
        let mut reasons = Vec::new();
        for (name, s) in lock(&self.streams).iter() {
            if s.auth_failed {
                reasons.push(format!(
                    "{name}: token rejected: {}",
                    s.last_error.as_deref().unwrap_or("the API refused the token")
                ));
                continue;
            }
            let recent = |t: Option<Instant>| t.is_some_and(|t| now.duration_since(t) <= s.interval * 3);
            if !recent(s.last_success) && !recent(s.last_progress) {
                let why = match (&s.last_success, &s.last_error) {
                    (None, None) => "first poll not completed yet".to_string(),
                    (_, Some(e)) => format!("no successful poll within 3 intervals; last error: {e}"),
                    (Some(_), None) => "no successful poll within 3 intervals".to_string(),
                };
                reasons.push(format!("{name}: {why}"));
            }
        }
        for (sink, reason) in lock(&self.refused_sinks).iter() {
            reasons.push(format!("sink {sink}: credentials refused: {reason}"));
        }
        if let Err(mut dead) = self.alive() {
            reasons.append(&mut dead);
        }
        if reasons.is_empty() { Ok(()) } else { Err(reasons) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_is_wrong() {
        let h = Health::default();
        h.register_stream("user_activity", Duration::from_secs(60));
        assert!(h.ready().unwrap_err()[0].contains("first poll not completed"));
        // A first backfill that is storing pages is ready; one that fails is not.
        h.poll_progress("user_activity");
        assert_eq!(h.ready(), Ok(()));
        h.poll_failed("user_activity", "HTTP 503", false);
        assert!(h.ready().unwrap_err()[0].contains("HTTP 503"));
        h.poll_failed("user_activity", "HTTP 401", true);
        assert!(h.ready().unwrap_err()[0].contains("token rejected"));
        h.poll_ok("user_activity");
        assert_eq!(h.ready(), Ok(()));
        h.sink_credentials_refused("hook", "HTTP 403");
        assert!(h.ready().unwrap_err()[0].contains("sink hook: credentials refused"));
        h.sink_ok("hook");
        assert_eq!(h.ready(), Ok(()));
        h.exited("sink hook");
        assert!(h.alive().is_err() && h.ready().is_err());
    }
}
