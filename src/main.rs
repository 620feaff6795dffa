use clap::Parser;

fn main() {
    // A bug must still end in one readable line, not a backtrace dump.
    std::panic::set_hook(Box::new(|info| {
        // A third-party decoder failing on bad input inside the library's guard: reported as an error.
        if tpp::panic_is_guarded() {
            return;
        }
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied());
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("error: internal error{at}: {} (please report this)", msg.unwrap_or("unknown").replace('\n', " "));
    }));
    let cli = match tpp::cli::Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version print as clap shows them; a usage error is its first line (it names the flag
        // and the problem), exit code 2.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.render().to_string();
            eprintln!("{}", text.lines().next().unwrap_or("error: invalid arguments"));
            std::process::exit(2);
        }
    };
    tpp::cli::output::init(cli.verbose, cli.quiet);
    if let Err(e) = tpp::cli::run(cli) {
        // One line, the whole context chain ("file: problem: cause"). Bad input exits 2 (as usage errors
        // do), a failure while running 1, a bug (the panic hook above) 101.
        eprintln!("error: {e:#}");
        std::process::exit(if tpp::Error::is_input(&e) { 2 } else { 1 });
    }
}
