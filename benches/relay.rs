//! A shaping TCP relay as a program, for the benchmark scripts: a link with
//! a round trip of `--rtt-ms` and, optionally, a bandwidth of `--mbit` per
//! direction between a client and `--to` (benches/common/relay.rs says
//! how). A bench target only so that it builds with the benches (`cargo
//! bench --bench relay --no-run`); it measures nothing.
//!
//! Usage: relay --to HOST:PORT [--listen ADDR] [--rtt-ms F] [--mbit F]
//!
//! `--listen` defaults to 127.0.0.1:0. Line 1 of stdout is `listening
//! ADDR` (the address bound). Runs until killed; at SIGTERM or SIGINT it
//! prints its counters to stderr and exits 0. The `--bench` cargo passes
//! to bench targets is ignored.
use std::net::SocketAddr;
use std::process::ExitCode;

#[path = "common/relay.rs"]
mod relay;
use relay::{Relay, Shape};

const USAGE: &str = "usage: relay --to HOST:PORT [--listen ADDR] [--rtt-ms F] [--mbit F]";

struct Args {
    listen: SocketAddr,
    to: String,
    rtt_ms: f64,
    mbit: f64,
}

fn parse_args() -> Result<Args, String> {
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut to = None;
    let (mut rtt_ms, mut mbit) = (0.0, 0.0);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        let number = |name: &str, v: String| {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or(format!("{name}: not a number >= 0: {v}"))
        };
        match a.as_str() {
            "--bench" => {}
            "--listen" => {
                let v = value("--listen")?;
                listen = v.parse().map_err(|e| format!("--listen {v}: {e}"))?;
            }
            "--to" => to = Some(value("--to")?),
            "--rtt-ms" => rtt_ms = number("--rtt-ms", value("--rtt-ms")?)?,
            "--mbit" => mbit = number("--mbit", value("--mbit")?)?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a}\n{USAGE}")),
        }
    }
    let to = to.ok_or(format!("--to is required\n{USAGE}"))?;
    Ok(Args {
        listen,
        to,
        rtt_ms,
        mbit,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let Some(shape) = Shape::from_ms_mbit(args.rtt_ms, args.mbit) else {
        eprintln!("bad --rtt-ms or --mbit");
        return ExitCode::from(2);
    };
    let relay = match Relay::start(args.listen, args.to.clone(), shape).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("relay: listening on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    // A script waits for this line (from a pipe or a file): flushed now,
    // and a closed stdout ends the relay rather than panicking.
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if writeln!(out, "listening {}", relay.addr)
            .and_then(|()| out.flush())
            .is_err()
        {
            return ExitCode::FAILURE;
        }
    }
    eprintln!(
        "relay: {} -> {}, rtt {} ms, {}",
        relay.addr,
        args.to,
        args.rtt_ms,
        if shape.bytes_per_sec == 0 {
            "no bandwidth cap".to_string()
        } else {
            format!("{} Mbit/s per direction", args.mbit)
        }
    );
    let stats = relay.stats.clone();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("relay: SIGTERM handler: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        () = relay.wait() => {}
    }
    eprintln!("relay at exit: {}", stats.line());
    ExitCode::SUCCESS
}
