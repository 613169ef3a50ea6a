//! Measurements for `scripts/bench` that the shell cannot make precisely:
//!
//! - `argon2-rate`: the raw argon2id rate of this machine, with the parameters the
//!   service uses (`AUTH_PASSWORD_HASH_*`, same defaults) and one thread per
//!   hashing slot (`AUTH_PASSWORD_HASH_CONCURRENCY`, default: the number of CPUs),
//!   so login throughput can be judged as a ratio of it, measured in the same run.
//!   Each thread hashes into one working buffer it keeps, as the service's hashing
//!   threads do. (Allocating it per hash, as `verify_password` does, measures the
//!   allocator: glibc's arenas grew by a buffer per hash, to hundreds of MiB, and
//!   the page faults halved the rate whenever the machine was busy.)
//! - `start-to-ready`: spawns a command (the server), polls `GET /health` on a
//!   loopback port every 2 ms until it answers 200, and prints the milliseconds from
//!   spawn to that answer. The server is left running; its pid goes to a file.
//!
//! Output is one JSON object on stdout. Built by `scripts/bench` with
//! `cargo build --release --example bench_helper`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Command, ExitCode, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use argon2::{Algorithm, Argon2, Block, Params, Version};

fn usage() -> ExitCode {
    eprintln!(
        "usage: bench_helper argon2-rate [SECONDS]\n       \
         bench_helper start-to-ready PORT PID_FILE TIMEOUT_MS -- COMMAND [ARGS...]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("argon2-rate") => {
            let seconds = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5.0);
            argon2_rate(seconds)
        }
        Some("start-to-ready") if args.len() >= 6 && args[4] == "--" => {
            let (Ok(port), Ok(timeout_ms)) = (args[1].parse::<u16>(), args[3].parse::<u64>())
            else {
                return usage();
            };
            start_to_ready(port, &args[2], timeout_ms, &args[5..])
        }
        _ => usage(),
    }
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn argon2_rate(seconds: f64) -> ExitCode {
    let memory_kib = env_number("AUTH_PASSWORD_HASH_MEMORY_KIB", 19_456u32);
    let iterations = env_number("AUTH_PASSWORD_HASH_ITERATIONS", 2u32);
    let parallelism = env_number("AUTH_PASSWORD_HASH_PARALLELISM", 1u32);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = env_number("AUTH_PASSWORD_HASH_CONCURRENCY", cpus).max(1);
    let params = match Params::new(memory_kib, iterations, parallelism, None) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bench_helper: bad argon2 parameters: {e}");
            return ExitCode::FAILURE;
        }
    };
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let password = b"correct horse battery staple 42";
    let salt = *b"sixteen byte salt";
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, done, argon2) = (stop.clone(), done.clone(), argon2.clone());
            std::thread::spawn(move || {
                let mut memory = vec![Block::default(); argon2.params().block_count()];
                let mut out = [0u8; 32];
                while !stop.load(Ordering::Relaxed) {
                    if argon2
                        .hash_password_into_with_memory(password, &salt, &mut out, &mut memory)
                        .is_ok()
                    {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    // Hashes still running at the stop signal finish and count, so divide by the
    // time until they did.
    let elapsed = started.elapsed().as_secs_f64();
    let hashes = done.load(Ordering::Relaxed);
    let rate = hashes as f64 / elapsed;
    println!(
        "{{\"memory_kib\":{memory_kib},\"iterations\":{iterations},\"parallelism\":{parallelism},\
         \"threads\":{threads},\"hashes\":{hashes},\"seconds\":{elapsed:.3},\"rate\":{rate:.2},\
         \"ms_per_hash\":{:.2}}}",
        if rate > 0.0 {
            threads as f64 * 1000.0 / rate
        } else {
            0.0
        }
    );
    ExitCode::SUCCESS
}

/// Whether `GET /health` on the port answers 200 right now.
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && &head[9..12] == b"200"
}

fn start_to_ready(port: u16, pid_file: &str, timeout_ms: u64, command: &[String]) -> ExitCode {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    // The child's stdout goes to our stderr: our stdout is read by a shell's `$(...)`,
    // which would otherwise wait for the server to exit.
    let child = match Command::new(&command[0])
        .args(&command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench_helper: cannot start {}: {e}", command[0]);
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::write(pid_file, format!("{}\n", child.id())) {
        eprintln!("bench_helper: cannot write {pid_file}: {e}");
    }
    let deadline = started + Duration::from_millis(timeout_ms);
    while Instant::now() < deadline {
        if healthy(addr) {
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            println!("{{\"ready_ms\":{ms:.1},\"pid\":{}}}", child.id());
            // The child keeps running: dropping a std Child neither waits nor kills.
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    eprintln!("bench_helper: /health on {addr} not 200 within {timeout_ms} ms");
    ExitCode::FAILURE
}
