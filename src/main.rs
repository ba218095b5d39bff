//! The `quotagate` binary: everything lives in the library; this only hands over to the CLI.

/// mimalloc's per-thread free lists: a request allocates and frees many small buffers on its
/// worker thread, and glibc's allocator showed as ~10 % of the gateway's profile (README,
/// "HTTP benchmark").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    quotagate::cli::main()
}
