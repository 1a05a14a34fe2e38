//! A minimal authoritative DNS server for the lab's broken zone: answers every UDP query
//! with a fixed response code and no records.

use std::net::{SocketAddr, UdpSocket};

/// Length of the DNS header.
const HEADER_LEN: usize = 12;

/// Serves until the process is killed.
pub fn serve(listen: SocketAddr, rcode: u8) -> std::io::Result<()> {
    let socket = UdpSocket::bind(listen)?;
    let mut buffer = [0u8; 512];
    loop {
        let (length, peer) = socket.recv_from(&mut buffer)?;
        if let Some(response) = answer(&buffer[..length], rcode) {
            socket.send_to(&response, peer)?;
        }
    }
}

/// The query echoed back as a response with `rcode`: QR and RA set, the question kept,
/// no answer, authority or additional records.
fn answer(query: &[u8], rcode: u8) -> Option<Vec<u8>> {
    if query.len() < HEADER_LEN {
        return None;
    }
    let mut response = query.to_vec();
    // Flags: QR=1, opcode and RD from the query, RA=1, RCODE.
    response[2] = 0x80 | (query[2] & 0x79);
    response[3] = 0x80 | (rcode & 0x0f);
    // Keep the question count; zero the other counts, and drop anything after the
    // question section's end is not needed: additional records (EDNS) are cut below.
    response[6..12].fill(0);
    let question_end = question_end(query)?;
    response.truncate(question_end);
    Some(response)
}

/// Offset just past the first question (name, type, class).
fn question_end(message: &[u8]) -> Option<usize> {
    let mut at = HEADER_LEN;
    loop {
        let length = usize::from(*message.get(at)?);
        at += 1;
        if length == 0 {
            break;
        }
        at += length;
    }
    let end = at + 4;
    (end <= message.len()).then_some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_with_the_rcode_and_the_question() {
        let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
        query.extend_from_slice(&[1, b'a', 4, b't', b'e', b's', b't', 0, 0, 1, 0, 1]);
        query.extend_from_slice(&[0, 0, 41, 2, 0, 0, 0, 0, 0, 0, 0]);
        let response = answer(&query, 2).unwrap();
        assert_eq!(&response[..4], &[0x12, 0x34, 0x81, 0x82]);
        assert_eq!(&response[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(response.len(), 12 + 12);
        assert_eq!(answer(&query[..5], 2), None);
        assert_eq!(answer(&query[..14], 2), None);
    }
}
