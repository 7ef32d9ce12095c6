//! The `broker` binary: runs a parley node (`broker serve`), mints tokens (`broker token`) and
//! chats from a terminal (`broker chat`). `broker help` lists the commands and their flags.

mod cli;

/// mimalloc instead of the system allocator: the hot path (decode, route, deliver) allocates
/// small, short-lived frames and strings, where glibc's malloc showed up as ~40% of a shard's
/// CPU under load (free-list consolidation); see bench/RESULTS.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in the bundled mimalloc (v3 `mimalloc.h`: the option after
/// `mi_option_eager_commit_delay`, 14, and before `mi_option_use_numa_nodes`, 16).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Milliseconds mimalloc waits before returning freed memory to the OS: never (-1). Its
/// default (10) made it `madvise(MADV_DONTNEED)` and fault the same pages back hundreds of times
/// a second under load (~8% of a shard's CPU in `strace -c`; a 1 s delay only batched them).
/// The broker's memory is bounded by its limits, so the process keeps its high-water mark.
const PURGE_DELAY_MS: std::os::raw::c_long = -1;

fn main() -> std::process::ExitCode {
    // SAFETY: `mi_option_set` stores an integer in mimalloc's option table; it is called once,
    // before any other thread exists, with an option index of the bundled header and a value
    // mimalloc documents for it (N ms, or -1 for never).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    cli::main()
}
