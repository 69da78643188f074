use clap::Parser;
use tvix_virtiofsd::cli::Cli;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match tvix_virtiofsd::cli::main(cli) {
        Ok(code) => code,
        Err(e) if tvix_virtiofsd::cli::stdout_closed(&e) => {
            // End as other tools do when their reader is gone: by SIGPIPE,
            // silently (status 141 in a shell).
            // SAFETY: resetting a signal to its default and raising it.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
            std::process::ExitCode::from(141)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
