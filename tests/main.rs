//! One integration-test binary (`autotests = false`) keeps link time down.

mod codec_differential;
