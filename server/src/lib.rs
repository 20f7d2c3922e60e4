//! `ferrovol-server`: stores volumes in a data dir and serves them over the ferrovol wire protocol.
//!
//! [`store`] owns the data dir (volumes as sparse files, metadata replaced atomically); [`connection`]
//! runs one client connection (handshake, pipelined requests, out-of-order replies, in-flight limits);
//! [`handler`] turns each request into store calls; [`listener`] accepts connections and shuts down
//! gracefully.

pub mod connection;
pub mod error;
pub mod files;
pub mod handler;
pub mod listener;
pub mod metrics;
pub mod notify;
pub mod store;
pub mod testing;

pub use listener::{Auth, Server, ServerConfig};
