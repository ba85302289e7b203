//! One integration-test binary (`autotests = false`) keeps link time down.

mod util;

mod codec_differential;
mod e2e;
mod hardening;
mod hostile;
mod leaks;
mod ssh;
mod termination;
mod tls;
