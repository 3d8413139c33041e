//! The Opsera API client: authentication, one request per call with
//! retries, and untrusting response parsing. It knows the endpoints' shapes
//! but nothing of windows or state (that is the poller's job).

mod client;
mod page;
pub(crate) mod split;

pub use client::{ApiError, Client};
pub use page::{CountMeaning, Page, Record, parse_page, snippet};
