//! HTTP: bearer-token authentication shared by every HTTP route the worker
//! serves (see [`auth`]), and the jobs API ([`jobs`]).

pub mod auth;
pub mod jobs;
pub mod ops;
