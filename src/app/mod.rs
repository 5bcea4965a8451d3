//! The application on top of the library: the command line ([`cli`]), the HTTP server
//! ([`server`]) and the benchmark ([`bench`]). Only this module knows HTTP, flags and
//! the async runtime; nothing in the library imports it.

pub mod bench;
pub mod cli;
pub mod server;
