use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("TPP_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    // A bug must still end in one readable line, not a backtrace dump.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied());
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("error: internal error{at}: {} (please report this)", msg.unwrap_or("unknown").replace('\n', " "));
    }));
    let cli = tpp::cli::Cli::parse();
    if let Err(e) = tpp::cli::run(cli) {
        // One line, the whole context chain ("file: problem: cause").
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
