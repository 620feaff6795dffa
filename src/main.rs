use clap::Parser;

fn main() {
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
    tpp::cli::output::init(cli.verbose, cli.quiet);
    if let Err(e) = tpp::cli::run(cli) {
        // One line, the whole context chain ("file: problem: cause").
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
