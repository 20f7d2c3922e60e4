//! Test helpers: the in-process server lives in `ferrovol_server::testing`.
#![allow(dead_code)]

pub use ferrovol_server::testing::TestServer;
