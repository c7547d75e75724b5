//! fleet-agent integration tests: the real binary, real files, a real broker, real signed
//! releases and the real fleet-demo-app as the application.
#![allow(clippy::unwrap_used)]

mod bluegreen;
mod cli;
mod container;
mod crash;
mod data;
mod fetch;
mod library;
mod link;
mod refusals;
mod security;
mod support;
mod update;
