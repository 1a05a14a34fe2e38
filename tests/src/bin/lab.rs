//! The lab's helper binary: processes the lab runs inside its namespaces, and `clean`.
//!
//! `lab serve-http --listen ADDR [--listen ADDR…] [--status N]` runs the HTTP endpoint;
//! `lab clean` removes every lab object left on this machine.

use std::{net::SocketAddr, process::ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve-http") => serve_http(&args[1..]),
        Some("clean") => clean(),
        _ => Err("usage: lab serve-http --listen ADDR [--status N] | lab clean".to_owned()),
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
