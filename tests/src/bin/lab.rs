//! The lab's helper binary: processes the lab runs inside its namespaces, and `clean`.
//!
//! `lab serve-http --listen ADDR [--listen ADDR…] [--status N]` runs the HTTP endpoint;
//! `lab serve-dns --listen ADDR --rcode N` answers every DNS query with that response code;
//! `lab udp-send ADDR [--connect | --count N]` sends one datagram (or N, to N ports);
//! `lab hold-tcp ADDR --count N --seconds S` opens N TCP connections and holds them;
//! `lab slow-clients ADDR --count N --seconds S` opens N connections to an HTTP server
//! and sends each one's request a byte a second (slowloris);
//! `lab up` builds a lab with two pods, prints how to use it, and keeps it until killed
//! (for exploring by hand); `lab clean` removes every lab object left on this machine.

use std::{net::SocketAddr, process::ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve-http") => serve_http(&args[1..]),
        Some("serve-dns") => serve_dns(&args[1..]),
        Some("udp-send") => udp_send(&args[1..]),
        Some("hold-tcp") => hold_tcp(&args[1..]),
        Some("slow-clients") => slow_clients(&args[1..]),
        Some("connect-burst") => connect_burst(&args[1..]),
        Some("connect-loop") => connect_loop(&args[1..]),
        Some("dns-loop") => dns_loop(&args[1..]),
        Some("serve-sink") => serve_sink(&args[1..]),
        Some("clean") => clean(),
        Some("up") => up(),
        _ => {
            Err("usage: lab serve-http --listen ADDR [--status N] | lab serve-dns --listen ADDR --rcode N | lab udp-send ADDR [--connect | --count N] | lab hold-tcp ADDR --count N --seconds S | lab slow-clients ADDR --count N --seconds S | lab connect-burst ADDR --count N | lab connect-loop ADDR --seconds S [--parallel N] [--rate R] | lab dns-loop SERVER NAME --seconds S [--parallel N] | lab serve-sink --listen ADDR | lab up | lab clean".to_owned())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lab: {e}");
            ExitCode::from(2)
        }
    }
}

fn serve_http(args: &[String]) -> Result<(), String> {
    let mut listen: Vec<SocketAddr> = Vec::new();
    let mut status = 200u16;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen.push(
                value
                    .parse()
                    .map_err(|e| format!("--listen {value}: {e}"))?,
            ),
            "--status" => {
                status = value
                    .parse()
                    .map_err(|e| format!("--status {value}: {e}"))?
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if listen.is_empty() {
        return Err("serve-http needs at least one --listen".into());
    }
    egress_lab::http::serve(&listen, status).map_err(|e| e.to_string())
}

fn serve_dns(args: &[String]) -> Result<(), String> {
    match args {
        [listen_flag, listen, rcode_flag, rcode]
            if listen_flag == "--listen" && rcode_flag == "--rcode" =>
        {
            let listen = listen
                .parse()
                .map_err(|e| format!("--listen {listen}: {e}"))?;
            let rcode = rcode.parse().map_err(|e| format!("--rcode {rcode}: {e}"))?;
            egress_lab::dns_server::serve(listen, rcode).map_err(|e| e.to_string())
        }
        _ => Err("usage: lab serve-dns --listen ADDR --rcode N".into()),
    }
}

/// Sends one datagram to ADDR (with `sendto`, or after `connect` with `--connect`) and
/// waits a moment for an ICMP error to come back.
fn udp_send(args: &[String]) -> Result<(), String> {
    let usage = || "usage: lab udp-send ADDR [--connect | --count N]".to_owned();
    let (address, connect, count) = match args {
        [address] => (address, false, 1),
        [address, flag] if flag == "--connect" => (address, true, 1),
        [address, flag, n] if flag == "--count" => {
            (address, false, n.parse::<u16>().map_err(|_| usage())?)
        }
        _ => return Err(usage()),
    };
    let address: std::net::SocketAddr = address.parse().map_err(|e| format!("{address}: {e}"))?;
    if count > 1 {
        // A burst of first sends, one to each of `count` ports from ADDR's up.
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        for offset in 0..count {
            let mut to = address;
            to.set_port(address.port().wrapping_add(offset));
            socket.send_to(b"lab", to).map_err(|e| e.to_string())?;
        }
        return Ok(());
    }
    let bind: std::net::SocketAddr = if address.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("valid");
    let socket = std::net::UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    if connect {
        socket.connect(address).map_err(|e| e.to_string())?;
        socket.send(b"lab").map_err(|e| e.to_string())?;
    } else {
        socket.send_to(b"lab", address).map_err(|e| e.to_string())?;
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    Ok(())
}

/// `ADDR --count N --seconds S` of the `command`s that take them.
fn address_count_seconds(command: &str, args: &[String]) -> Result<(SocketAddr, u16, u64), String> {
    let usage = || format!("usage: lab {command} ADDR --count N --seconds S");
    let [address, count_flag, count, seconds_flag, seconds] = args else {
        return Err(usage());
    };
    if count_flag != "--count" || seconds_flag != "--seconds" {
        return Err(usage());
    }
    let address: SocketAddr = address.parse().map_err(|e| format!("{address}: {e}"))?;
    let count: u16 = count.parse().map_err(|_| usage())?;
    let seconds: u64 = seconds.parse().map_err(|_| usage())?;
    Ok((address, count, seconds))
}

/// Opens `--count` TCP connections to ADDR one after the other and keeps them open,
/// idle, for `--seconds` (flows that hold SNAT ports).
fn hold_tcp(args: &[String]) -> Result<(), String> {
    let (address, count, seconds) = address_count_seconds("hold-tcp", args)?;
    let held = (0..count)
        .map(|_| std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_secs(3)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("connect {address}: {e}"))?;
    std::thread::sleep(std::time::Duration::from_secs(seconds));
    drop(held);
    Ok(())
}

/// Opens `--count` connections to the HTTP server at ADDR (those it refuses are let go)
/// and, for `--seconds`, sends each one's request headers a byte a second, never ending
/// them; prints how many were opened and how many the server closed.
fn slow_clients(args: &[String]) -> Result<(), String> {
    use std::io::Write;
    let (address, count, seconds) = address_count_seconds("slow-clients", args)?;
    let mut open: Vec<std::net::TcpStream> = (0..count)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_secs(3)).ok()
        })
        .collect();
    let opened = open.len();
    let request = b"GET /metrics HTTP/1.1\r\nHost: agent\r\nX-Slow: ";
    let started = std::time::Instant::now();
    let mut sent = 0;
    while started.elapsed() < std::time::Duration::from_secs(seconds) {
        let byte = &request[sent % request.len()..][..1];
        // A connection the server closed fails its write (at once or at the next one).
        open.retain_mut(|stream| stream.write_all(byte).is_ok());
        sent += 1;
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    println!("opened {opened} closed-by-server {}", opened - open.len());
    Ok(())
}

/// Opens `--count` TCP connections to ADDR back to back, as fast as the kernel allows,
/// keeps them until the last is open, and fails unless all were established (a burst
/// that overflows a small ring buffer).
fn connect_burst(args: &[String]) -> Result<(), String> {
    let usage = || "usage: lab connect-burst ADDR --count N".to_owned();
    let [address, count_flag, count] = args else {
        return Err(usage());
    };
    if count_flag != "--count" {
        return Err(usage());
    }
    let address: SocketAddr = address.parse().map_err(|e| format!("{address}: {e}"))?;
    let count: u16 = count.parse().map_err(|_| usage())?;
    let mut held = Vec::with_capacity(usize::from(count));
    let mut failed = 0;
    for _ in 0..count {
        match std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_secs(5)) {
            Ok(stream) => held.push(stream),
            Err(_) => failed += 1,
        }
    }
    println!("established {} failed {failed}", held.len());
    if failed > 0 {
        return Err(format!(
            "{failed} of {count} connections to {address} failed"
        ));
    }
    Ok(())
}

/// `--seconds S [--parallel N] [--rate R]` of a load generator.
struct Load {
    seconds: f64,
    parallel: u32,
    /// Units per second in all threads together, if paced.
    rate: Option<f64>,
}

impl Load {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut load = Load {
            seconds: 0.0,
            parallel: 1,
            rate: None,
        };
        let mut rest = args.iter();
        while let Some(flag) = rest.next() {
            let value = rest.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let number: f64 = value
                .parse()
                .map_err(|_| format!("{flag} takes a number"))?;
            match flag.as_str() {
                "--seconds" => load.seconds = number,
                "--parallel" => load.parallel = (number as u32).clamp(1, 64),
                "--rate" if number > 0.0 => load.rate = Some(number),
                _ => {
                    return Err(format!(
                        "unknown flag {flag} (--seconds, --parallel, --rate)"
                    ));
                }
            }
        }
        if load.seconds <= 0.0 {
            return Err("--seconds is required".into());
        }
        Ok(load)
    }

    /// Runs units of work (each made by `make`, once per thread; true when a unit
    /// succeeded) on `--parallel` threads for `--seconds`, paced to `--rate`; prints
    /// "succeeded failed seconds".
    fn run<F: FnMut() -> bool>(
        &self,
        make: impl Fn() -> Result<F, String> + Sync,
    ) -> Result<(), String> {
        let start = std::time::Instant::now();
        let end = std::time::Duration::from_secs_f64(self.seconds);
        let interval = self
            .rate
            .map(|rate| std::time::Duration::from_secs_f64(f64::from(self.parallel) / rate));
        let results: Vec<Result<(u64, u64), String>> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..self.parallel)
                .map(|_| {
                    scope.spawn(|| {
                        let mut unit = make()?;
                        let (mut succeeded, mut failed) = (0u64, 0u64);
                        let mut next = start;
                        while start.elapsed() < end {
                            if let Some(interval) = interval {
                                if let Some(wait) =
                                    next.checked_duration_since(std::time::Instant::now())
                                {
                                    std::thread::sleep(wait);
                                }
                                next += interval;
                            }
                            if unit() {
                                succeeded += 1;
                            } else {
                                failed += 1;
                            }
                        }
                        Ok((succeeded, failed))
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err("a load thread panicked".into()))
                })
                .collect()
        });
        let (mut succeeded, mut failed) = (0, 0);
        for result in results {
            let (s, f) = result?;
            succeeded += s;
            failed += f;
        }
        println!("{succeeded} {failed} {:.3}", start.elapsed().as_secs_f64());
        Ok(())
    }
}

/// Connects to ADDR and closes after the server did, again and again (a benchmark load).
fn connect_loop(args: &[String]) -> Result<(), String> {
    let [address, rest @ ..] = args else {
        return Err("usage: lab connect-loop ADDR --seconds S [--parallel N] [--rate R]".into());
    };
    let address: SocketAddr = address.parse().map_err(|e| format!("{address}: {e}"))?;
    Load::parse(rest)?.run(|| {
        Ok(move || {
            let Ok(mut stream) = std::net::TcpStream::connect(address) else {
                return false;
            };
            // Wait for the server's close, so the client's port is free at once (no
            // TIME_WAIT on this side, which would exhaust the ports of a long run).
            let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(1)));
            let mut byte = [0u8; 1];
            matches!(std::io::Read::read(&mut stream, &mut byte), Ok(0))
        })
    })
}

/// Asks SERVER for NAME's A record, one query after the other on each thread (a
/// benchmark load).
fn dns_loop(args: &[String]) -> Result<(), String> {
    let [server, name, rest @ ..] = args else {
        return Err("usage: lab dns-loop SERVER NAME --seconds S [--parallel N]".into());
    };
    let server: std::net::IpAddr = server.parse().map_err(|e| format!("{server}: {e}"))?;
    let mut query = vec![0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    Load::parse(rest)?.run(|| {
        let bind = if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let socket = std::net::UdpSocket::bind(bind).map_err(|e| e.to_string())?;
        socket.connect((server, 53)).map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .map_err(|e| e.to_string())?;
        let mut query = query.clone();
        let mut id: u16 = 0;
        let mut buffer = [0u8; 512];
        Ok(move || {
            id = id.wrapping_add(1);
            query[..2].copy_from_slice(&id.to_be_bytes());
            if socket.send(&query).is_err() {
                return false;
            }
            // Answers to earlier, timed-out queries are skipped.
            loop {
                match socket.recv(&mut buffer) {
                    Ok(n) if n >= 2 && buffer[..2] == id.to_be_bytes() => return true,
                    Ok(_) => continue,
                    Err(_) => return false,
                }
            }
        })
    })
}

/// Accepts TCP connections on ADDR and closes them at once, on two threads, until
/// killed (the benchmarks' endpoint: it costs less than any real server).
fn serve_sink(args: &[String]) -> Result<(), String> {
    let [flag, address] = args else {
        return Err("usage: lab serve-sink --listen ADDR".into());
    };
    if flag != "--listen" {
        return Err("usage: lab serve-sink --listen ADDR".into());
    }
    let listener =
        std::net::TcpListener::bind(address.as_str()).map_err(|e| format!("{address}: {e}"))?;
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                for stream in listener.incoming() {
                    drop(stream);
                }
            });
        }
    });
    Ok(())
}

fn up() -> Result<(), String> {
    use egress_lab::{CgroupDriver, Lab, PodSpec};
    let lab = Lab::start(&[
        PodSpec::new("default", "client", CgroupDriver::Systemd),
        PodSpec::new("shop", "other", CgroupDriver::Cgroupfs),
    ])
    .map_err(|e| e.to_string())?;
    println!("lab {} is up", lab.id());
    println!("  node:          ip netns exec {} bash", lab.node_netns());
    for pod in lab.pods() {
        println!(
            "  pod {:<14} ip netns exec {} bash   (ip {}, pid {})",
            pod.key(),
            pod.netns,
            pod.ip,
            pod.pid
        );
    }
    println!("  cluster state: {}", lab.cluster_state().display());
    println!("Ctrl-C removes it.");
    // Wait for SIGINT/SIGTERM, then drop the lab (teardown).
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: standard signal-mask calls on a local set.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut signal = 0;
        libc::sigwait(&set, &mut signal);
    }
    drop(lab);
    Ok(())
}

fn clean() -> Result<(), String> {
    let found = egress_lab::clean_leftovers().map_err(|e| e.to_string())?;
    if found.is_empty() {
        println!("no lab leftovers");
    } else {
        println!(
            "removed {} network namespace(s), {} cgroup tree(s), {} state dir(s)",
            found.netns.len(),
            found.cgroups.len(),
            found.state_dirs.len()
        );
    }
    Ok(())
}
