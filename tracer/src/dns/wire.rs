//! The DNS wire format (RFC 1035), as far as the tracer reads it: the header, the first
//! question, and the A, AAAA and CNAME answers. Every DNS message a traced process sends
//! or receives passes here, so nothing is allocated beyond the strings kept.
//!
//! Hostile input cannot loop: a compression pointer must point before everything read of
//! its name so far, and a name is at most 255 bytes.

use std::{
    borrow::Cow,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::{Serialize, Serializer, ser::SerializeStruct};

/// A DNS message, as far as the tracer cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsMessage {
    pub id: u16,
    pub is_response: bool,
    /// `NOERROR`, `NXDOMAIN`, `SERVFAIL`, `REFUSED`, …
    pub rcode: Cow<'static, str>,
    /// The TC bit: the answer did not fit (UDP), retry over TCP.
    pub truncated: bool,
    pub question: Option<Question>,
    pub answers: Vec<Answer>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Question {
    /// Lowercase, without the trailing dot.
    pub name: String,
    /// `A`, `AAAA`, … (`TYPE65280` for types without a mnemonic).
    #[serde(rename = "type")]
    pub qtype: Cow<'static, str>,
}

/// An A, AAAA or CNAME answer; serialized as `{"name", "type", "value"}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub name: String,
    pub value: AnswerValue,
}

impl Answer {
    /// `A`, `AAAA` or `CNAME`: what its value is.
    pub fn rtype(&self) -> &'static str {
        match self.value {
            AnswerValue::Address(IpAddr::V4(_)) => "A",
            AnswerValue::Address(IpAddr::V6(_)) => "AAAA",
            AnswerValue::Name(_) => "CNAME",
        }
    }
}

impl Serialize for Answer {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut answer = serializer.serialize_struct("Answer", 3)?;
        answer.serialize_field("name", &self.name)?;
        answer.serialize_field("type", self.rtype())?;
        answer.serialize_field("value", &self.value)?;
        answer.end()
    }
}

/// What an answer says: an address (A, AAAA) or the canonical name (CNAME). Shown and
/// serialized as text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnswerValue {
    Address(IpAddr),
    Name(String),
}

impl fmt::Display for AnswerValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AnswerValue::Address(ip) => ip.fmt(f),
            AnswerValue::Name(name) => f.write_str(name),
        }
    }
}

impl Serialize for AnswerValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum DnsError {
    #[error("empty DNS payload")]
    Empty,
    #[error("TCP DNS payload shorter than its length prefix")]
    ShortTcpPrefix,
    #[error("malformed DNS message: {0}")]
    Malformed(&'static str),
}

const HEADER_LEN: usize = 12;
const FLAG_RESPONSE: u16 = 0x8000;
const FLAG_TRUNCATED: u16 = 0x0200;
const RCODE_MASK: u16 = 0x000f;
const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;
/// Longest name on the wire, length bytes included (RFC 1035 2.3.4).
const MAX_NAME_LEN: usize = 255;
/// Room for the text of most names (longer ones grow once).
const NAME_CAPACITY: usize = 64;
/// The two top bits of a label length byte that make it a compression pointer.
const POINTER: u8 = 0xc0;

/// Parses one message; `framed` payloads start with a 2-byte length (TCP). `cut` says the
/// kernel copied only a prefix of a longer message: then the header, the question and the
/// answers that fit are read, and the rest is ignored. Uncut, any record that does not
/// parse makes the message malformed.
pub fn parse(payload: &[u8], framed: bool, cut: bool) -> Result<DnsMessage, DnsError> {
    let message = if framed {
        payload.get(2..).ok_or(DnsError::ShortTcpPrefix)?
    } else {
        payload
    };
    if message.is_empty() {
        return Err(DnsError::Empty);
    }
    let header = message
        .get(..HEADER_LEN)
        .ok_or(DnsError::Malformed("shorter than a DNS header"))?;
    let word = |at: usize| u16::from_be_bytes([header[at], header[at + 1]]);
    let (id, flags) = (word(0), word(2));
    let [questions, answer_count, authorities, additionals] = [word(4), word(6), word(8), word(10)];

    let mut reader = Reader {
        message,
        at: HEADER_LEN,
    };
    let mut question = None;
    for index in 0..questions {
        let name = reader.name(index == 0)?;
        let qtype = reader.u16()?;
        reader.u16()?;
        if index == 0 {
            question = Some(Question {
                name,
                qtype: type_name(qtype),
            });
        }
    }
    let mut answers = Vec::new();
    for _ in 0..answer_count {
        match reader.answer() {
            Ok(Some(answer)) => answers.push(answer),
            Ok(None) => {}
            // What did not fit in the copied prefix is not there to read.
            Err(_) if cut => break,
            Err(e) => return Err(e),
        }
    }
    if !cut {
        for _ in 0..u32::from(authorities) + u32::from(additionals) {
            reader.skip_record()?;
        }
    }
    Ok(DnsMessage {
        id,
        is_response: flags & FLAG_RESPONSE != 0,
        rcode: rcode_name(flags & RCODE_MASK),
        truncated: flags & FLAG_TRUNCATED != 0,
        question,
        answers,
    })
}

/// A position in a message.
struct Reader<'a> {
    message: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, length: usize) -> Result<&[u8], DnsError> {
        let bytes = self
            .message
            .get(self.at..self.at + length)
            .ok_or(DnsError::Malformed("a record runs past the end"))?;
        self.at += length;
        Ok(bytes)
    }

    fn u16(&mut self) -> Result<u16, DnsError> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    /// The name here (as text when `keep`, else empty), moving past it.
    fn name(&mut self, keep: bool) -> Result<String, DnsError> {
        let (name, end) = read_name(self.message, self.at, keep)?;
        self.at = end;
        Ok(name)
    }

    /// One answer record; `None` for types other than A, AAAA and CNAME.
    fn answer(&mut self) -> Result<Option<Answer>, DnsError> {
        let name_at = self.at;
        self.name(false)?;
        let rtype = self.u16()?;
        // Class and TTL.
        self.take(6)?;
        let length = usize::from(self.u16()?);
        let data_at = self.at;
        let data = self.take(length)?;
        let value = match (rtype, data.len()) {
            (TYPE_A, 4) => {
                AnswerValue::Address(Ipv4Addr::new(data[0], data[1], data[2], data[3]).into())
            }
            (TYPE_AAAA, 16) => {
                let octets: [u8; 16] = data.try_into().expect("length checked");
                AnswerValue::Address(Ipv6Addr::from(octets).into())
            }
            (TYPE_A | TYPE_AAAA, _) => {
                return Err(DnsError::Malformed("an address of the wrong length"));
            }
            (TYPE_CNAME, _) => {
                let (target, end) = read_name(self.message, data_at, true)?;
                if end != data_at + length {
                    return Err(DnsError::Malformed("a CNAME longer than its record"));
                }
                AnswerValue::Name(target)
            }
            _ => return Ok(None),
        };
        let (name, _) = read_name(self.message, name_at, true)?;
        Ok(Some(Answer { name, value }))
    }

    fn skip_record(&mut self) -> Result<(), DnsError> {
        self.name(false)?;
        // Type, class and TTL.
        self.take(8)?;
        let length = usize::from(self.u16()?);
        self.take(length)?;
        Ok(())
    }
}

/// The (possibly compressed) name at `start`: its text, lowercase and without the
/// trailing dot (empty unless `keep`), and where the record continues after it.
fn read_name(message: &[u8], start: usize, keep: bool) -> Result<(String, usize), DnsError> {
    // Most names fit: one allocation, and the text is not copied or validated again.
    let mut text = if keep {
        String::with_capacity(NAME_CAPACITY)
    } else {
        String::new()
    };
    let end = walk_name(message, start, |label| {
        if keep {
            push_label(&mut text, label);
        }
    })?;
    Ok((text, end))
}

/// Calls `on_label` with each label of the name at `start`, in order; returns where the
/// record continues after the name.
fn walk_name(
    message: &[u8],
    start: usize,
    mut on_label: impl FnMut(&[u8]),
) -> Result<usize, DnsError> {
    let mut at = start;
    // Where the record continues: after the first pointer, or after the final zero.
    let mut end = None;
    // Every pointer must point below this: before all of the name read so far.
    let mut lowest = start;
    let mut length = 0;
    loop {
        let &label_len = message
            .get(at)
            .ok_or(DnsError::Malformed("a name runs past the end"))?;
        if label_len & POINTER == POINTER {
            let low = *message
                .get(at + 1)
                .ok_or(DnsError::Malformed("a name runs past the end"))?;
            let target = usize::from(u16::from_be_bytes([label_len & !POINTER, low]));
            if target >= lowest {
                return Err(DnsError::Malformed(
                    "a compression pointer that does not point back",
                ));
            }
            end.get_or_insert(at + 2);
            lowest = target;
            at = target;
            continue;
        }
        if label_len & POINTER != 0 {
            return Err(DnsError::Malformed("an unknown label type"));
        }
        let label_len = usize::from(label_len);
        length += label_len + 1;
        if length > MAX_NAME_LEN {
            return Err(DnsError::Malformed("a name longer than 255 bytes"));
        }
        if label_len == 0 {
            return Ok(end.unwrap_or(at + 1));
        }
        let label = message
            .get(at + 1..at + 1 + label_len)
            .ok_or(DnsError::Malformed("a label runs past the end"))?;
        on_label(label);
        at += 1 + label_len;
    }
}

/// Whether `byte` stands for itself in a name's text (see [`push_label`]).
fn is_plain(byte: u8) -> bool {
    matches!(byte, 0x21..=0x7e) && byte != b'.' && byte != b'\\'
}

/// Appends a label as dig prints it, lowercased, after a dot unless it is the first:
/// `.`, `\` and unprintable bytes are escaped (`\DDD`).
fn push_label(text: &mut String, label: &[u8]) {
    if !text.is_empty() {
        text.push('.');
    }
    for &byte in label {
        if is_plain(byte) {
            text.push(char::from(byte.to_ascii_lowercase()));
        } else if byte == b'.' || byte == b'\\' {
            text.push('\\');
            text.push(char::from(byte));
        } else {
            text.push('\\');
            for digit in [byte / 100, byte / 10 % 10, byte % 10] {
                text.push(char::from(b'0' + digit));
            }
        }
    }
}

/// The mnemonic of a record type, as dig prints it.
fn type_name(code: u16) -> Cow<'static, str> {
    let name = match code {
        TYPE_A => "A",
        2 => "NS",
        TYPE_CNAME => "CNAME",
        6 => "SOA",
        12 => "PTR",
        15 => "MX",
        16 => "TXT",
        TYPE_AAAA => "AAAA",
        33 => "SRV",
        35 => "NAPTR",
        43 => "DS",
        48 => "DNSKEY",
        64 => "SVCB",
        65 => "HTTPS",
        255 => "ANY",
        257 => "CAA",
        other => return format!("TYPE{other}").into(),
    };
    name.into()
}

/// The RFC mnemonic of a response code (`NXDOMAIN`), as dig prints it.
pub fn rcode_name(code: u16) -> Cow<'static, str> {
    let name = match code {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        other => return format!("RCODE{other}").into(),
    };
    name.into()
}

#[cfg(test)]
/// DNS messages built by hand, for the tests of the parser and of the tracker.
pub(super) mod test_messages {
    /// Builds a DNS message by hand: header, one question, and A answers.
    pub fn message(id: u16, flags: u16, name: &str, qtype: u16, answers: &[[u8; 4]]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(&(answers.len() as u16).to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]);
        for label in name.split('.') {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        for address in answers {
            // Name: pointer to the question name at offset 12.
            m.extend_from_slice(&[0xc0, 12]);
            m.extend_from_slice(&1u16.to_be_bytes());
            m.extend_from_slice(&1u16.to_be_bytes());
            m.extend_from_slice(&30u32.to_be_bytes());
            m.extend_from_slice(&4u16.to_be_bytes());
            m.extend_from_slice(address);
        }
        m
    }

    pub const QUERY: u16 = 0x0100;
    pub const RESPONSE: u16 = 0x8180;
    pub const NXDOMAIN: u16 = 0x8183;
    pub const SERVFAIL: u16 = 0x8182;
    pub const TRUNCATED: u16 = 0x8380;
    pub const A: u16 = 1;
    pub const AAAA: u16 = 28;
}

#[cfg(test)]
mod tests {
    use super::{test_messages::*, *};

    #[test]
    fn parses_a_query_and_a_response() {
        let query = parse(&message(7, QUERY, "Api.Example.Test", A, &[]), false, false).unwrap();
        assert_eq!(
            (query.id, query.is_response, query.truncated),
            (7, false, false)
        );
        assert_eq!(
            query.question,
            Some(Question {
                name: "api.example.test".into(),
                qtype: "A".into()
            })
        );
        let response = parse(
            &message(7, RESPONSE, "api.example.test", A, &[[203, 0, 113, 10]]),
            false,
            false,
        )
        .unwrap();
        assert_eq!(
            (response.is_response, response.rcode.as_ref()),
            (true, "NOERROR")
        );
        assert_eq!(
            response.answers,
            vec![Answer {
                name: "api.example.test".into(),
                value: AnswerValue::Address([203, 0, 113, 10].into())
            }]
        );
    }

    #[test]
    fn tcp_messages_carry_a_length_prefix() {
        let body = message(9, NXDOMAIN, "x.example.test", A, &[]);
        let mut framed = (body.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&body);
        let parsed = parse(&framed, true, false).unwrap();
        assert_eq!((parsed.id, parsed.rcode.as_ref()), (9, "NXDOMAIN"));
        assert_eq!(parse(&[0], true, false), Err(DnsError::ShortTcpPrefix));
    }

    #[test]
    fn a_cut_message_keeps_its_complete_answers() {
        let addresses: Vec<[u8; 4]> = (0..40).map(|i| [203, 0, 113, 100 + i]).collect();
        let full = message(5, RESPONSE, "big.example.test", A, &addresses);
        assert!(full.len() > 512);
        let prefix = &full[..512];
        assert!(matches!(
            parse(prefix, false, false),
            Err(DnsError::Malformed(_))
        ));
        let parsed = parse(prefix, false, true).unwrap();
        assert_eq!((parsed.id, parsed.rcode.as_ref()), (5, "NOERROR"));
        // 12 + 22 bytes of header and question, 16 bytes per answer.
        assert_eq!(parsed.answers.len(), (512 - 34) / 16);
        assert_eq!(parsed.answers[0].value.to_string(), "203.0.113.100");
        // A prefix that does not even hold the question is still malformed.
        assert!(matches!(
            parse(&full[..20], false, true),
            Err(DnsError::Malformed(_))
        ));
    }

    #[test]
    fn hostile_messages_are_malformed_not_fatal() {
        // A compression pointer that points at itself.
        let mut looping = message(1, RESPONSE, "a.test", A, &[]);
        looping.truncate(12);
        looping.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        // A label length running past the end.
        let mut overlong = message(2, QUERY, "a.test", A, &[]);
        overlong[12] = 63;
        overlong.truncate(20);
        // A zero-length label in the middle is the root: trailing bytes are garbage.
        let zero_label = [0u8, 3, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        // Header counts promising records that are not there.
        let mut lying = message(3, RESPONSE, "a.test", A, &[]);
        lying[7] = 200;
        for (what, bytes) in [
            ("pointer loop", looping),
            ("label past end", overlong),
            ("zero label", zero_label.to_vec()),
            ("lying counts", lying),
            ("short header", vec![1, 2, 3]),
        ] {
            assert!(
                matches!(parse(&bytes, false, false), Err(DnsError::Malformed(_))),
                "{what}"
            );
        }
        assert_eq!(parse(&[], false, false), Err(DnsError::Empty));
    }

    /// A response as a real server encodes it (hickory-proto's encoder compresses names).
    fn encoded_response() -> Vec<u8> {
        use hickory_proto::{
            op::{Message, MessageType, Query},
            rr::{Name, RData, Record, RecordType, rdata},
        };
        let name = Name::from_ascii("WWW.Example.Test.").unwrap();
        let target = Name::from_ascii("edge.example.test.").unwrap();
        let mut message = Message::new();
        message
            .set_id(77)
            .set_message_type(MessageType::Response)
            .add_query(Query::query(name.clone(), RecordType::A));
        message.add_answer(Record::from_rdata(
            name,
            30,
            RData::CNAME(rdata::CNAME(target.clone())),
        ));
        message.add_answer(Record::from_rdata(
            target.clone(),
            30,
            RData::A(rdata::A::new(192, 0, 2, 7)),
        ));
        message.add_answer(Record::from_rdata(
            target.clone(),
            30,
            RData::AAAA(rdata::AAAA::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7)),
        ));
        message.add_answer(Record::from_rdata(
            target,
            30,
            RData::TXT(rdata::TXT::new(vec!["skipped".into()])),
        ));
        message.to_vec().unwrap()
    }

    #[test]
    fn compressed_cname_chains_and_both_address_families() {
        let parsed = parse(&encoded_response(), false, false).unwrap();
        assert_eq!((parsed.id, parsed.is_response), (77, true));
        assert_eq!(
            parsed.question,
            Some(Question {
                name: "www.example.test".into(),
                qtype: "A".into()
            })
        );
        let answers: Vec<_> = parsed
            .answers
            .iter()
            .map(|a| serde_json::to_value(a).unwrap())
            .collect();
        let answer = |name: &str, rtype: &str, value: &str| serde_json::json!({"name": name, "type": rtype, "value": value});
        assert_eq!(
            answers,
            vec![
                answer("www.example.test", "CNAME", "edge.example.test"),
                answer("edge.example.test", "A", "192.0.2.7"),
                answer("edge.example.test", "AAAA", "2001:db8::7"),
            ]
        );
    }

    #[test]
    fn a_pointer_back_into_its_own_name_is_refused() {
        // The name at 12 is the label `a` followed by a pointer to 12: following it would
        // read `a` forever.
        let mut message = message(4, QUERY, "a", A, &[]);
        message.truncate(12);
        message.extend_from_slice(&[1, b'a', 0xc0, 12, 0, 1, 0, 1]);
        assert!(matches!(
            parse(&message, false, false),
            Err(DnsError::Malformed(_))
        ));
    }

    #[test]
    fn names_longer_than_255_bytes_are_refused() {
        let long = vec!["a".repeat(63); 4].join(".");
        assert!(matches!(
            parse(&message(5, QUERY, &long, A, &[]), false, false),
            Err(DnsError::Malformed(_))
        ));
        let longest = [
            "a".repeat(63),
            "a".repeat(63),
            "a".repeat(63),
            "a".repeat(61),
        ]
        .join(".");
        let parsed = parse(&message(5, QUERY, &longest, A, &[]), false, false).unwrap();
        assert_eq!(parsed.question.unwrap().name, longest);
    }

    #[test]
    fn unusual_bytes_and_types_are_named_as_dig_names_them() {
        // One label, `A.b` and the byte 1: its dot is part of the label.
        let mut bytes = message(6, QUERY, "x", 65280, &[]);
        bytes.splice(12..14, [4, b'A', b'.', b'b', 1]);
        let question = parse(&bytes, false, false).unwrap().question.unwrap();
        assert_eq!(
            (question.name.as_str(), question.qtype.as_ref()),
            ("a\\.b\\001", "TYPE65280")
        );
        // The longest name, every byte escaped to four characters.
        let mut bytes = message(7, QUERY, "x", A, &[]);
        let mut name = Vec::new();
        for length in [63u8, 63, 63, 61] {
            name.push(length);
            name.extend(std::iter::repeat_n(0xff, usize::from(length)));
        }
        bytes.splice(12..14, name);
        let question = parse(&bytes, false, false).unwrap().question.unwrap();
        let label = |length| "\\255".repeat(length);
        assert_eq!(
            question.name,
            [label(63), label(63), label(63), label(61)].join(".")
        );
    }
}
