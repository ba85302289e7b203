//! One integration-test binary (`autotests = false`) keeps link time down.

mod util;

mod abuse;
mod cluster;
mod codec_differential;
mod console;
mod control_channels;
mod e2e;
mod hardening;
mod hostile;
mod in_process;
mod leaks;
mod reload;
mod spares;
mod ssh;
mod tcp_semantics;
mod termination;
mod tls;
