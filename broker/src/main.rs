//! The `broker` binary: runs a parley node (`broker serve`), mints tokens (`broker token`) and
//! chats from a terminal (`broker chat`). `broker help` lists the commands and their flags.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
