//! The `auth-service` binary: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    auth_service::cli::run(auth_service::cli::Cli::parse()).await
}
