//! `loadgen`: load-tests parley (and the peers) with every message checked on arrival.

use clap::Parser;
use parley_loadgen::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Relay(opts) => match parley_loadgen::relay::run(&opts, |addr| {
            println!("relay listening {addr}");
        }) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("loadgen relay: {e}");
                2
            }
        },
        cmd => parley_loadgen::run::main(cmd),
    };
    std::process::exit(code);
}
