//! The `ringway` binary: allocator, command line, logging, exit codes. Everything else lives in
//! the library so tests can drive it.

// mimalloc: the relay holds tens of thousands of small per-tunnel allocations and churns
// sessions; mimalloc keeps that fast and its RSS low, where glibc malloc fragments per thread.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    println!("ringway {}", env!("CARGO_PKG_VERSION"));
}
