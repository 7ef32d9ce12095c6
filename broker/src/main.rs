//! The `broker` binary: runs a parley node (`broker serve`), mints tokens (`broker token`) and
//! chats from a terminal (`broker chat`). `broker help` lists the commands and their flags.

mod cli;

/// mimalloc instead of the system allocator: the hot path (decode, route, deliver) allocates
/// small, short-lived frames and strings, where glibc's malloc showed up as ~40% of a shard's
/// CPU under load (free-list consolidation); see bench/RESULTS.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
