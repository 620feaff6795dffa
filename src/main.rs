use clap::Parser;

fn main() {
    tpp::device::tune_host_allocator();
    // A bug must still end in one readable line, not a backtrace dump.
    std::panic::set_hook(Box::new(|info| {
        // A third-party decoder failing on bad input inside the library's guard: reported as an error.
        if tpp::panic_is_guarded() {
            return;
        }
        let msg = panic_message(info.payload());
        // Running out of memory is not a bug: main reports it with a hint.
        if msg.is_some_and(is_out_of_memory) {
            return;
        }
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("error: internal error{at}: {} (please report this)", msg.unwrap_or("unknown").replace('\n', " "));
    }));
    let cli = match tpp::cli::Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version print as clap shows them; a usage error is its first line (it names the flag
        // and the problem), exit code 2.
        Err(e) if !e.use_stderr() || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            e.exit()
        }
        Err(e) => {
            // The first paragraph, on one line: it holds the message and any names it lists (the
            // required arguments not given).
            let text = e.render().to_string();
            let first: Vec<&str> = text.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
            let line = if first.is_empty() { "error: invalid arguments".to_string() } else { first.join(" ") };
            eprintln!("{line}");
            std::process::exit(2);
        }
    };
    tpp::cli::output::init(cli.verbose, cli.quiet);
    let result = match std::panic::catch_unwind(|| tpp::cli::run(cli)) {
        Ok(r) => r,
        Err(payload) => match panic_message(payload.as_ref()).filter(|m| is_out_of_memory(m)) {
            // libtorch reports an allocation failure as an exception, which tch turns into a panic.
            Some(m) => {
                eprintln!("error: {}; try a smaller batch size or image size", out_of_memory_line(m));
                std::process::exit(1);
            }
            // The hook has printed it.
            None => std::process::exit(101),
        },
    };
    if let Err(e) = result {
        // One line, the whole context chain ("file: problem: cause"). Bad input exits 2 (as usage errors
        // do), a failure while running 1, a bug (the panic hook above) 101.
        eprintln!("error: {e:#}");
        std::process::exit(if tpp::Error::is_input(&e) { 2 } else { 1 });
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied())
}

/// libtorch's messages when an allocation fails (CUDA caching allocator, CPU allocator).
fn is_out_of_memory(msg: &str) -> bool {
    msg.contains("out of memory") || msg.contains("can't allocate memory") || msg.contains("CUDA error: out of memory")
}

/// The allocator's own sentence ("... you tried to allocate N bytes", "CUDA out of memory. Tried to
/// allocate ..."), without libtorch's frame dump.
fn out_of_memory_line(msg: &str) -> String {
    let start =
        ["can't allocate memory", "CUDA out of memory", "out of memory"].iter().find_map(|k| msg.find(k)).unwrap_or(0);
    let rest = &msg[start..];
    let end = ["\\n", "\n", ". Error code", " (GPU", ". If reserved"].iter().filter_map(|k| rest.find(k)).min();
    format!("out of memory: {}", rest[..end.unwrap_or(rest.len())].trim_end_matches(['.', ' ']))
}
