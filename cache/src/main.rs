use clap::Parser;
use regmirror_cache::config::{Cli, Config, LogFormat};

/// mimalloc, not the libc's malloc: a cold body arrives in hyper's receive
/// buffers (up to about 400 KiB each, a new one per read while several MiB
/// of earlier ones are still queued to be written and hashed), and glibc
/// hands each freed buffer's pages back to the kernel at once (it trims a
/// heap's top above twice the largest chunk freed so far), so the next
/// buffer is faulted in and zeroed again: about 40 page faults per MiB
/// received and 7% of the cache's CPU on a cold GiB (`perf`, issue 20).
/// mimalloc reuses freed pages for the next buffers (0.05 faults per MiB).
/// jemalloc, measured side by side too, faulted more and held 3x the RSS
/// per warm stream (bench scenario 7); mimalloc held the least.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::resolve(Cli::parse())?;
    init_tracing(config.log_format);
    let listener = regmirror_cache::listen::bind(config.listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    regmirror_cache::serve(config, listener, shutdown_signal()).await
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REGMIRROR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a terminal: in a pod's or a file's log they are
    // noise (issue 18).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
