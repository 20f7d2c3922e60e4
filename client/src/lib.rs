//! `ferrovol-client`: the async, pipelined ferrovol protocol client.
//!
//! ```no_run
//! # async fn demo() -> ferrovol_client::Result<()> {
//! use ferrovol_client::{ConnectOptions, Session};
//! let session = Session::connect("127.0.0.1:7700", ConnectOptions::default()).await?;
//! let name = "demo".parse().unwrap();
//! session.create_volume(&name, 64 << 20).await?;
//! let vol = session.open(&name, false).await?;
//! vol.write_at(0, bytes::Bytes::from_static(b"hello")).await?;
//! vol.flush().await?; // durable from here on
//! assert_eq!(&vol.read_at(0, 5).await?[..], b"hello");
//! # Ok(()) }
//! ```
//! Many requests may be in flight at once from many tasks; a [`Session`] may use several connections.
//! Reconnects are transparent for data operations (see [`conn`](crate::conn) for the rules).

pub mod attachd;
mod conn;
mod credential;
pub mod error;
pub mod fuse;
pub mod host;
mod session;
mod volume;

pub use conn::Notices;
pub use credential::default_credential_file;
pub use error::{ClientError, Result};
pub use session::{ClientTls, ConnectOptions, Session, SessionStats};
pub use volume::Volume;

/// Default server address when neither `--server` nor `FERROVOL_SERVER` is given.
pub const DEFAULT_SERVER: &str = "127.0.0.1:7700";
