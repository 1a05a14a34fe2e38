//! A minimal HTTP/1.1 endpoint for the lab's "internet": answers every request with a
//! fixed status and closes the connection.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

/// Serves on every address until the process is killed.
pub fn serve(listen: &[SocketAddr], status: u16) -> std::io::Result<()> {
    let listeners = listen
        .iter()
        .map(TcpListener::bind)
        .collect::<std::io::Result<Vec<_>>>()?;
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    thread::spawn(move || respond(stream, status));
                }
            })
        })
        .collect();
    for handle in handles {
        let _ = handle.join();
    }
    Ok(())
}

fn respond(stream: TcpStream, status: u16) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    // Read the request head; the body (if any) is ignored.
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        if line == "\r\n" || line == "\n" {
            break;
        }
        line.clear();
    }
    let body = format!("lab endpoint: {status}\n");
    let response = format!(
        "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reason(status),
        body.len()
    );
    let _ = (&stream).write_all(response.as_bytes());
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        403 => "Forbidden",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
