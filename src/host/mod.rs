//! The host the daemon runs on: what it asks of the kernel and of systemd,
//! and how it confines itself. Nothing here knows the store; the commands
//! in `cli` tell it which paths and addresses to expose.
pub mod fd_pass;
pub mod free_space;
pub mod memory;
pub mod notify;
pub mod privileges;
pub mod sandbox;
pub mod seccomp;
pub mod socket;
