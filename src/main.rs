//! The `auth-service` binary: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;

/// A request allocates and frees dozens of small buffers (headers, JSON, futures)
/// across the runtime's worker threads; with mimalloc's per-thread free lists
/// validation served about a third more requests per second than with glibc's
/// malloc (`scripts/bench`, README "Performance"). Built without transparent huge
/// pages (`no_thp`): with them every thread's heap rounded up to 2 MiB of RSS.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    return_freed_memory_at_once();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(auth_service::cli::run(auth_service::cli::Cli::parse()))
}

/// mimalloc hands freed memory back to the OS after a delay, on a later call into
/// the allocator; an idle replica makes none, so what startup's dummy password hash
/// (19 MiB) or a burst had freed stayed resident. Purging at once kept idle RSS
/// where glibc had it. (`MIMALLOC_PURGE_DELAY` in the environment still wins.)
#[allow(unsafe_code)]
fn return_freed_memory_at_once() {
    // `mi_option_purge_delay` in mimalloc v3's include/mimalloc.h; the -sys crate
    // names only some options.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc's options are plain globals
        // meant to be set at any time, and no other thread exists yet.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 0) };
    }
}
