//! The application on top of the library: the command line ([`cli`]), the HTTP server
//! ([`server`]), the benchmark ([`bench`]) and the logger ([`logging`]). Only this module knows HTTP, flags and
//! the async runtime; nothing in the library imports it.

pub mod bench;
pub mod cli;
pub mod logging;
pub mod server;
