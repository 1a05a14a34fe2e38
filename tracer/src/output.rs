//! Renders attempts for people (`-o table`) and programs (`-o json`, NDJSON).
//!
//! The JSON field names follow the output contract in `shared/design/hops.md`.

use std::{
    io::{self, Write},
    net::SocketAddr,
    time::SystemTime,
};

use serde::Serialize;

use crate::{
    flow::{Attempt, Protocol},
    node::MonotonicClock,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for a terminal.
    Table,
    /// One JSON object per line (NDJSON).
    Json,
}

/// The NDJSON record of one attempt.
#[derive(Debug, Serialize, PartialEq)]
pub struct AttemptRecord<'a> {
    pub time: String,
    pub pod: Option<&'a str>,
    pub pod_uid: Option<&'a str>,
    pub process: Process<'a>,
    pub protocol: Protocol,
    pub src: Option<SocketAddr>,
    pub dst: SocketAddr,
    pub cgroup_id: u64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Process<'a> {
    pub pid: u32,
    pub comm: &'a str,
}

impl<'a> AttemptRecord<'a> {
    pub fn new(attempt: &'a Attempt, clock: MonotonicClock) -> Self {
        Self {
            time: rfc3339(clock.to_wall(attempt.monotonic_ns)),
            pod: attempt.origin.pod.as_deref(),
            pod_uid: attempt.origin.pod_uid.as_deref(),
            process: Process {
                pid: attempt.pid,
                comm: &attempt.comm,
            },
            protocol: attempt.protocol,
            src: attempt.src,
            dst: attempt.dst,
            cgroup_id: attempt.cgroup_id,
        }
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_micros(time).to_string()
}

/// Writes attempts in one format; the table header is written before the first row.
pub struct Writer<W: Write> {
    out: W,
    format: Format,
    clock: MonotonicClock,
    header_written: bool,
}

const TABLE_COLUMNS: [(&str, usize); 7] = [
    ("TIME", 15),
    ("POD", 28),
    ("PID", 7),
    ("COMM", 15),
    ("PROTO", 5),
    ("SRC", 22),
    ("DST", 0),
];

impl<W: Write> Writer<W> {
    pub fn new(out: W, format: Format, clock: MonotonicClock) -> Self {
        Self {
            out,
            format,
            clock,
            header_written: false,
        }
    }

    pub fn write(&mut self, attempt: &Attempt) -> io::Result<()> {
        let record = AttemptRecord::new(attempt, self.clock);
        match self.format {
            Format::Json => {
                serde_json::to_writer(&mut self.out, &record)?;
                writeln!(self.out)
            }
            Format::Table => {
                if !self.header_written {
                    let header: Vec<&str> = TABLE_COLUMNS.iter().map(|(name, _)| *name).collect();
                    self.row(&header)?;
                    self.header_written = true;
                }
                let time = record.time.get(11..26).unwrap_or(&record.time).to_owned();
                let pod = record.pod.unwrap_or("(host)");
                let pid = record.process.pid.to_string();
                let protocol = match record.protocol {
                    Protocol::Tcp => "tcp",
                    Protocol::Udp => "udp",
                };
                let src = record.src.map_or_else(|| "-".to_owned(), |s| s.to_string());
                let dst = record.dst.to_string();
                self.row(&[&time, pod, &pid, record.process.comm, protocol, &src, &dst])
            }
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn row(&mut self, cells: &[&str]) -> io::Result<()> {
        let mut line = String::new();
        for ((_, width), cell) in TABLE_COLUMNS.iter().zip(cells) {
            if *width == 0 {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$} "));
            }
        }
        writeln!(self.out, "{}", line.trim_end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::Origin;

    fn attempt(pod: Option<&str>) -> Attempt {
        Attempt {
            monotonic_ns: 5_000_000_000,
            origin: Origin {
                pod: pod.map(str::to_owned),
                pod_uid: pod.map(|_| "6f1c2a3b-4d5e-4f60-8a9b-0c1d2e3f4a5b".to_owned()),
            },
            pid: 4242,
            comm: "curl".into(),
            cgroup_id: 77,
            protocol: Protocol::Tcp,
            src: Some("10.244.0.5:41234".parse().unwrap()),
            dst: "203.0.113.10:80".parse().unwrap(),
        }
    }

    fn render(format: Format, attempts: &[Attempt]) -> String {
        let clock = MonotonicClock::new();
        let mut writer = Writer::new(Vec::new(), format, clock);
        for a in attempts {
            writer.write(a).unwrap();
        }
        String::from_utf8(writer.out).unwrap()
    }

    #[test]
    fn json_has_the_contract_fields() {
        let text = render(Format::Json, &[attempt(Some("shop/web"))]);
        let value: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(value["pod"], "shop/web");
        assert_eq!(
            value["process"],
            serde_json::json!({"pid": 4242, "comm": "curl"})
        );
        assert_eq!(value["protocol"], "tcp");
        assert_eq!(value["src"], "10.244.0.5:41234");
        assert_eq!(value["dst"], "203.0.113.10:80");
        let time = value["time"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
        assert_eq!(text.lines().count(), 1);
    }

    #[test]
    fn json_host_process_has_null_pod_and_ipv6_brackets() {
        let mut a = attempt(None);
        a.src = None;
        a.dst = "[2001:db8::10]:443".parse().unwrap();
        let value: serde_json::Value =
            serde_json::from_str(render(Format::Json, &[a]).trim_end()).unwrap();
        assert_eq!(value["pod"], serde_json::Value::Null);
        assert_eq!(value["src"], serde_json::Value::Null);
        assert_eq!(value["dst"], "[2001:db8::10]:443");
    }

    #[test]
    fn table_has_one_header_and_aligned_rows() {
        let text = render(Format::Table, &[attempt(Some("shop/web")), attempt(None)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("TIME"));
        let dst_column = lines[0].find("DST").unwrap();
        assert_eq!(lines[1].find("203.0.113.10:80"), Some(dst_column));
        assert_eq!(lines[2].find("203.0.113.10:80"), Some(dst_column));
        assert!(
            lines[1].contains("shop/web") && lines[1].contains("4242") && lines[1].contains("curl")
        );
        assert!(lines[2].contains("(host)"));
    }
}
