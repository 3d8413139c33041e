//! Window arithmetic: from a stream's checkpoint and the clock to the span
//! of time the next poll asks for, and from there to how long dedup ids
//! must be kept. Pure functions on epoch milliseconds; no I/O.
//!
//! The rules (see `opsera-api.md`):
//! - the next window starts at `min(watermark, polled_until) - overlap`,
//!   rounded down to the minute. Using the older of the newest stored
//!   `createdAt` (server clock) and the previous window's end (our clock)
//!   means neither clock skew nor late writes within the overlap open a gap;
//! - a v2 window ends at the last *whole* minute, fixed before paging, so
//!   records that arrive while we page stay outside the query;
//! - v1 endpoints read whole UTC days, from the start's day to today;
//! - an id may be forgotten once no later window can return its record.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, TimeZone, Utc};

pub const MINUTE: i64 = 60_000;
pub const DAY: i64 = 86_400_000;

/// Round `ms` down to a multiple of `unit` (works for negative values too).
pub fn floor_to(ms: i64, unit: i64) -> i64 {
    ms.div_euclid(unit) * unit
}

/// What the store remembers of a stream between polls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Newest `createdAt` durably stored (server clock), ms.
    pub watermark: Option<i64>,
    /// Exclusive upper bound of the last completed window (our clock), ms.
    pub polled_until: Option<i64>,
}

/// The un-rounded start of the next window.
pub fn next_start(cp: Checkpoint, overlap_ms: i64, lookback_ms: i64, now: i64) -> i64 {
    let floor_at_lookback = now - lookback_ms;
    let anchor = match (cp.watermark, cp.polled_until) {
        (Some(w), Some(p)) => w.min(p),
        (Some(w), None) => w,
        (None, Some(p)) => p,
        (None, None) => return floor_at_lookback,
    };
    anchor.saturating_sub(overlap_ms.max(0))
}

/// A v2 query window `[start, end]`, both on whole minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: i64,
    pub end: i64,
}

/// The next v2 window: start rounded down to the minute, end at the last whole minute.
pub fn v2_window(cp: Checkpoint, overlap_ms: i64, lookback_ms: i64, now: i64) -> Window {
    let end = floor_to(now, MINUTE) - MINUTE;
    let start = floor_to(next_start(cp, overlap_ms, lookback_ms, now), MINUTE).min(end);
    Window { start, end }
}

/// The UTC days (each as the ms of its midnight) a v1 poll reads: from the
/// day of the next start to today. A stream idle for longer than a day does
/// not make every poll re-read every day since its last record: the start
/// is clamped to one day (plus overlap) before the previous window's end.
pub fn v1_days(cp: Checkpoint, overlap_ms: i64, lookback_ms: i64, now: i64) -> Vec<i64> {
    let first = floor_to(v1_start(cp, overlap_ms, lookback_ms, now), DAY);
    let last = floor_to(now, DAY);
    (0..).map(|i| first + i * DAY).take_while(|d| *d <= last).collect()
}

fn v1_start(cp: Checkpoint, overlap_ms: i64, lookback_ms: i64, now: i64) -> i64 {
    let start = next_start(cp, overlap_ms, lookback_ms, now);
    match cp.polled_until {
        Some(p) => start.max(p - DAY - overlap_ms.max(0)).min(now),
        None => start.min(now),
    }
}

/// Ids of records created before this instant can no longer be returned by
/// any later poll, so their dedup rows may be dropped. One unit of margin
/// (an hour for minute windows, a day for daily ones) covers a server that
/// reads its bounds a little more generously than we do.
pub fn prune_before(daily: bool, cp: Checkpoint, overlap_ms: i64, lookback_ms: i64, now: i64) -> i64 {
    if daily {
        floor_to(v1_start(cp, overlap_ms, lookback_ms, now), DAY) - DAY
    } else {
        floor_to(next_start(cp, overlap_ms, lookback_ms, now), MINUTE) - 60 * MINUTE
    }
}

/// `YYYY-MM-DD` of the UTC day holding `ms`.
pub fn fmt_date(ms: i64) -> String {
    to_utc(ms).format("%Y-%m-%d").to_string()
}

/// `HH:mm` of `ms` in UTC.
pub fn fmt_time(ms: i64) -> String {
    to_utc(ms).format("%H:%M").to_string()
}

/// RFC 3339 with milliseconds and `Z`, as the API writes `createdAt`.
pub fn fmt_rfc3339(ms: i64) -> String {
    to_utc(ms).to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn to_utc(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Parse a record's `createdAt` into epoch ms. Accepts RFC 3339 with any
/// offset and fraction, and (leniently) a naive `YYYY-MM-DDTHH:MM:SS[.fff]`
/// taken as UTC.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    if let Some(t) = parse_canonical(s) {
        return Some(t);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_millis());
    }
    NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f").ok().map(|t| t.and_utc().timestamp_millis())
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, the form the API sends, read without chrono
/// (which takes the rest, and anything unusual, such as a leap second).
fn parse_canonical(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let seps = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':'), (19, b'.'), (23, b'Z')];
    if b.len() != 24 || seps.iter().any(|&(i, c)| b[i] != c) {
        return None;
    }
    let num = |from: usize, to: usize| {
        b[from..to].iter().try_fold(0i64, |n, c| c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0')))
    };
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, sec, ms) = (num(11, 13)?, num(14, 16)?, num(17, 19)?, num(20, 23)?);
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&mo) || d < 1 || d > month_days[mo as usize - 1] || h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let (y, m) = if mo <= 2 { (y - 1, mo + 9) } else { (y, mo - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + (153 * m + 2) / 5 + d - 1;
    let days = era * 146_097 + doe - 719_468;
    Some((((days * 24 + h) * 60 + mi) * 60 + sec) * 1000 + ms)
}

/// Parse a user-given point in time: RFC 3339, `YYYY-MM-DD` (midnight UTC),
/// or a duration meaning that long ago (`2d`).
pub fn parse_since(s: &str, now: i64) -> Option<i64> {
    if let Some(t) = parse_timestamp(s) {
        return Some(t);
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return d.and_hms_opt(0, 0, 0).map(|t| t.and_utc().timestamp_millis());
    }
    humantime::parse_duration(s).ok().map(|d| now - d.as_millis() as i64)
}

/// The wall clock in epoch ms.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: i64 = 1_700_000_000_000; // 2023-11-14T22:13:20Z

    proptest! {
        /// The fast path reads the API's own form exactly as chrono does, and
        /// leaves impossible dates (and leap seconds) to it.
        #[test]
        fn canonical_timestamps_read_as_chrono_reads_them(
            y in 0i64..=9999, mo in 0i64..=13, d in 0i64..=32, h in 0i64..=25, mi in 0i64..=61, sec in 0i64..=61, ms in 0i64..1000,
        ) {
            let s = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{sec:02}.{ms:03}Z");
            let chrono = DateTime::parse_from_rfc3339(&s).ok().map(|t| t.timestamp_millis());
            match parse_canonical(&s) {
                Some(fast) => prop_assert_eq!(Some(fast), chrono, "{}", s),
                None => prop_assert!(chrono.is_none() || sec == 60, "{s}: chrono reads {chrono:?}"),
            }
        }
    }

    #[test]
    fn canonical_timestamps_cover_the_usual_form_only() {
        assert_eq!(parse_canonical("2023-11-14T22:13:20.000Z"), Some(T0));
        assert_eq!(parse_canonical("2024-02-29T00:00:00.001Z"), Some(1_709_164_800_001));
        assert_eq!(parse_canonical("1969-12-31T23:59:59.999Z"), Some(-1));
        for other in [
            "2023-11-14T22:13:20Z",
            "2023-11-14T22:13:20.000+00:00",
            "2023-02-29T00:00:00.000Z",
            "2023-11-14 22:13:20.000Z",
        ] {
            assert_eq!(parse_canonical(other), None, "{other}");
        }
        assert_eq!(parse_timestamp("2023-11-14T22:13:20Z"), Some(T0));
    }

    #[test]
    fn first_poll_starts_at_lookback() {
        let w = v2_window(Checkpoint::default(), 5 * MINUTE, 7 * DAY, T0);
        assert_eq!(w.start, floor_to(T0 - 7 * DAY, MINUTE));
        assert_eq!(w.end, floor_to(T0, MINUTE) - MINUTE);
    }

    #[test]
    fn day_split_at_utc_midnight() {
        let midnight = floor_to(T0, DAY);
        let cp = Checkpoint { watermark: Some(midnight - 2 * MINUTE), polled_until: Some(midnight + MINUTE) };
        // Starts before midnight, so yesterday and today are both read.
        assert_eq!(v1_days(cp, 5 * MINUTE, 7 * DAY, midnight + 3 * MINUTE), vec![midnight - DAY, midnight]);
        let cp = Checkpoint { watermark: Some(midnight + 10 * MINUTE), polled_until: Some(midnight + 20 * MINUTE) };
        assert_eq!(v1_days(cp, 5 * MINUTE, 7 * DAY, midnight + 30 * MINUTE), vec![midnight]);
    }

    #[test]
    fn formats_query_dates_in_utc() {
        assert_eq!(fmt_date(T0), "2023-11-14");
        assert_eq!(fmt_time(T0), "22:13");
        assert_eq!(fmt_rfc3339(T0), "2023-11-14T22:13:20.000Z");
        assert_eq!(parse_timestamp("2021-07-30T16:13:52.109Z"), Some(1_627_661_632_109));
        assert_eq!(parse_timestamp("2021-07-30T18:13:52.109+02:00"), Some(1_627_661_632_109));
        assert_eq!(parse_timestamp("2021-07-30T16:13:52.109"), Some(1_627_661_632_109));
        assert_eq!(parse_timestamp("yesterday"), None);
    }

    proptest! {
        #[test]
        fn floor_is_a_multiple_at_or_below(ms in -10i64.pow(13)..10i64.pow(13), unit in prop_oneof![Just(MINUTE), Just(DAY)]) {
            let f = floor_to(ms, unit);
            prop_assert_eq!(f % unit, 0);
            prop_assert!(f <= ms && ms - f < unit);
        }

        /// The window never starts after any record that a previous window
        /// could have missed: anything newer than the watermark minus the
        /// overlap, or than the previous end minus the overlap.
        #[test]
        fn v2_window_covers_overlap(
            now in T0..T0 + 30 * DAY,
            wm_back in 0i64..10 * DAY,
            pu_back in 0i64..10 * DAY,
            overlap in 0i64..60 * MINUTE,
        ) {
            let cp = Checkpoint { watermark: Some(now - wm_back), polled_until: Some(now - pu_back) };
            let w = v2_window(cp, overlap, 7 * DAY, now);
            let must_cover = (now - wm_back).min(now - pu_back) - overlap;
            prop_assert!(w.start <= must_cover.max(w.end));
            prop_assert_eq!(w.start % MINUTE, 0);
            prop_assert_eq!(w.end % MINUTE, 0);
            prop_assert!(w.end < now && now - w.end <= 2 * MINUTE);
            prop_assert!(w.start <= w.end);
        }

        /// Consecutive v1 day lists overlap or touch: no day between two polls is skipped.
        #[test]
        fn v1_days_are_contiguous_and_end_today(
            now in T0..T0 + 30 * DAY,
            wm_back in 0i64..20 * DAY,
            overlap in 0i64..60 * MINUTE,
        ) {
            let cp = Checkpoint { watermark: Some(now - wm_back), polled_until: Some(now - MINUTE) };
            let days = v1_days(cp, overlap, 7 * DAY, now);
            prop_assert!(!days.is_empty());
            prop_assert_eq!(*days.last().unwrap(), floor_to(now, DAY));
            for pair in days.windows(2) { prop_assert_eq!(pair[1] - pair[0], DAY); }
            // Never more than a couple of days for a stream that polled a minute ago.
            prop_assert!(days.len() <= 3);
            // The day of the watermark - overlap is read, unless it is older than the clamp.
            let want = floor_to((now - wm_back).min(now - MINUTE) - overlap, DAY);
            prop_assert!(days[0] <= want || days[0] == floor_to(now - MINUTE - DAY - overlap, DAY));
        }

        /// Pruning never forgets an id that the next window can still return.
        #[test]
        fn prune_horizon_precedes_next_window(
            now in T0..T0 + 30 * DAY,
            wm_back in 0i64..20 * DAY,
            pu_back in 0i64..3 * DAY,
            overlap in 0i64..60 * MINUTE,
            daily in any::<bool>(),
            later in 0i64..10 * DAY,
        ) {
            let cp = Checkpoint { watermark: Some(now - wm_back), polled_until: Some(now - pu_back) };
            let horizon = prune_before(daily, cp, overlap, 7 * DAY, now);
            // Any later poll (the checkpoint only moves forward) starts at or after the horizon.
            let later_now = now + later;
            let first = if daily {
                v1_days(cp, overlap, 7 * DAY, later_now)[0]
            } else {
                v2_window(cp, overlap, 7 * DAY, later_now).start
            };
            prop_assert!(horizon <= first);
        }
    }
}
