//! opsera-shipper: gets Opsera's audit logs into a SIEM, losing none and
//! sending none twice.
//!
//! ```text
//!  Opsera API ──HTTP──▶ poller (one task per stream)        poller.rs, window.rs, opsera/
//!                          │  window = [min(watermark, last end) - overlap, last whole minute], paged
//!                          ▼
//!                    store (SQLite, WAL)                     store.rs, segments.rs
//!                          │  per page: bodies appended to a segment file (fsynced), then
//!                          │  one transaction: seen ids (dedup) + the page's journal row;
//!                          │  the watermark moves once a whole window is stored
//!                          ▼
//!                    dispatcher (one task per sink)          dispatch.rs
//!                          │  read the journal after the sink's cursor, deliver a batch,
//!                          │  then move the cursor
//!                          ▼
//!                    sinks: file, stdout                     sink/
//! ```
//!
//! - [`config`]: TOML + environment overlay → validated config; secrets.
//! - [`opsera`]: API client, retries, untrusting page parsing.
//! - [`window`]: window and day arithmetic, dedup horizons.
//! - [`poller`]: per-stream poll loop.
//! - [`store`]: SQLite state: checkpoints, dedup, journal index, cursors.
//! - [`segments`]: the journal's record bodies, in append-only files.
//! - [`dispatch`]: per-sink delivery loop.
//! - [`sink`]: the sink trait and the sinks.
//! - [`simulator`]: a simulated Opsera API for the demo and the tests.
//! - [`server`], [`health`], [`metrics`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`app`]: the commands (`run`, `once`, `demo`, `status`, `reset`, ...).

pub mod app;
pub mod cli;
pub mod config;
pub mod dispatch;
mod fsutil;
pub mod health;
pub mod http;
mod lenient;
pub mod metrics;
pub mod opsera;
pub mod poller;
pub mod segments;
pub mod server;
pub mod simulator;
pub mod sink;
pub mod store;
pub mod text;
pub mod window;
