//! HTTP: bearer-token authentication shared by every HTTP route the worker
//! serves (see [`auth`]).

pub mod auth;
