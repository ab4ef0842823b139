use clap::Parser;

switchyard::jemalloc_global!();

#[tokio::main]
async fn main() -> std::process::ExitCode {
    switchyard::init_logging();
    let cli = switchyard::cli::Cli::parse();
    match switchyard::cli::run(cli).await {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
