//! The mail-order-bot binary. See `mail-order-bot --help`.

use std::process::ExitCode;

use clap::Parser;
use mail_order_bot::cli::{execute, Cli};

fn main() -> ExitCode {
    // A parse helper (started by the bot itself) reads messages and nothing else: no
    // command line, no runtime, no logs.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == mail_order_bot::helper::HELPER_ARG)
    {
        return ExitCode::from(mail_order_bot::helper::serve());
    }
    mail_order_bot::helper::this_binary_serves_helpers();
    let cli = Cli::parse();
    // The fault suite's builds read `FAILPOINTS` (`name=action;...`); release builds have
    // no fault points at all.
    #[cfg(feature = "failpoints")]
    let _faults = fail::FailScenario::setup();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
