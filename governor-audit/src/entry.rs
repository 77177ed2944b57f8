//! One audit entry: its line format, its canonical hash, and parsing.

use std::fmt;
use std::str::FromStr;

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The `detail` object of an entry.
pub type Detail = Map<String, Value>;

/// Domain tag that starts every hashed message, so an audit hash can never be
/// confused with (or replayed as) a SHA-256 computed for another purpose, and
/// so a future v2 encoding cannot collide with v1.
pub const HASH_DOMAIN: &[u8] = b"governor-audit-v1\0";

/// `prev` of the first entry of a chain.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Longest line (including its newline) that is written or accepted. Readers
/// use it to keep memory bounded however the file was damaged.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Longest accepted `kind` and `service`, to keep entries small and readable.
const MAX_NAME_BYTES: usize = 256;

/// The position of a chain: the seq and hash of its newest entry.
///
/// Text form (head file, CLI): `SEQ:HASH`, e.g. `17:ab12…` with 64 hex digits.
/// `Head::genesis()` (`0:000…0`) is the position of an empty chain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Head {
    pub seq: u64,
    /// 64 lowercase hex digits.
    pub hash: String,
}

impl Head {
    /// The position before the first entry: seq 0, hash of 64 zeros.
    pub fn genesis() -> Head {
        Head {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        }
    }
}

impl fmt::Display for Head {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

/// Why a `SEQ:HASH` string was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadParseError(String);

impl fmt::Display for HeadParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HeadParseError {}

impl FromStr for Head {
    type Err = HeadParseError;

    /// Accepts `SEQ:HASH` with surrounding whitespace (the head file ends in a
    /// newline) and upper- or lowercase hex; the hash is stored lowercase.
    fn from_str(s: &str) -> Result<Head, HeadParseError> {
        let s = s.trim();
        let (seq, hash) = s.split_once(':').ok_or_else(|| {
            HeadParseError(format!(
                "head {s:?}: expected SEQ:HASH (e.g. 17:<64 hex digits>)"
            ))
        })?;
        let seq: u64 = seq.parse().map_err(|e| {
            HeadParseError(format!(
                "head {s:?}: seq {seq:?} is not a non-negative integer: {e}"
            ))
        })?;
        if !is_hex64(hash) {
            return Err(HeadParseError(format!(
                "head {s:?}: hash must be 64 hex digits, got {} characters{}",
                hash.chars().count(),
                if hash.chars().all(|c| c.is_ascii_hexdigit()) {
                    ""
                } else {
                    " (not all hex)"
                }
            )));
        }
        Ok(Head {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| c.is_ascii_hexdigit())
}

/// One line of the audit log.
///
/// Serializing an `Entry` with serde_json yields exactly its log line: keys in
/// the order `seq, ts, kind, service, detail, prev, hash`, and `detail` in
/// canonical form (object keys sorted at every depth).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    pub seq: u64,
    /// RFC 3339, UTC, as written by the writer.
    pub ts: String,
    pub kind: String,
    pub service: Option<String>,
    #[serde(serialize_with = "serialize_canonical_map")]
    pub detail: Detail,
    /// Hash of the previous entry (64 zeros for the first).
    pub prev: String,
    pub hash: String,
}

impl Entry {
    /// Builds the entry that follows `prev` and computes its hash. Validates
    /// `kind` and `service` (see [`validate_kind`]).
    pub fn chained(
        prev: &Head,
        ts: String,
        kind: &str,
        service: Option<&str>,
        detail: Detail,
    ) -> anyhow::Result<Entry> {
        validate_kind(kind)?;
        if let Some(s) = service {
            validate_service(s)?;
        }
        let seq = prev
            .seq
            .checked_add(1)
            .ok_or_else(|| anyhow::anyhow!("audit seq overflow"))?;
        let mut e = Entry {
            seq,
            ts,
            kind: kind.to_owned(),
            service: service.map(str::to_owned),
            detail,
            prev: prev.hash.clone(),
            hash: String::new(),
        };
        e.hash = e.compute_hash();
        Ok(e)
    }

    /// The chain position this entry establishes.
    pub fn head(&self) -> Head {
        Head {
            seq: self.seq,
            hash: self.hash.clone(),
        }
    }

    /// SHA-256 over `HASH_DOMAIN` followed by each field in a fixed order:
    /// `seq` as u64 big-endian; `ts`, `kind`, canonical `detail` and `prev` as
    /// (u64 BE length, bytes); `service` as a presence byte (0 or 1) followed,
    /// if present, by (length, bytes). Length prefixes make the encoding
    /// injective, so no two different entries hash the same message (plain
    /// concatenation would let `kind="a", service="bc"` equal `"ab","c"`).
    /// The stored `hash` field is not an input. Returns lowercase hex.
    pub fn compute_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(HASH_DOMAIN);
        h.update(self.seq.to_be_bytes());
        hash_field(&mut h, self.ts.as_bytes());
        hash_field(&mut h, self.kind.as_bytes());
        match &self.service {
            None => h.update([0u8]),
            Some(s) => {
                h.update([1u8]);
                hash_field(&mut h, s.as_bytes());
            }
        }
        hash_field(&mut h, &canonical_detail(&self.detail));
        hash_field(&mut h, self.prev.as_bytes());
        to_hex(&h.finalize())
    }

    /// The log line, without the trailing newline.
    pub fn to_line(&self) -> String {
        // Serializing plain strings, numbers and a Map to a String cannot fail;
        // fall back to a visibly broken line rather than panic if it ever did.
        serde_json::to_string(self).unwrap_or_else(|e| format!("<unserializable entry: {e}>"))
    }

    /// Parses one log line (with or without its trailing newline). Checks the
    /// shape only; hashes and links are [`crate::verify`]'s job.
    pub fn parse_line(line: &[u8]) -> Result<Entry, ParseError> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let v: Value =
            serde_json::from_slice(line).map_err(|e| ParseError::BadJson(e.to_string()))?;
        let Value::Object(mut obj) = v else {
            return Err(ParseError::BadJson("line is not a JSON object".to_owned()));
        };
        let mut take = |name: &'static str| obj.remove(name).ok_or(ParseError::MissingField(name));
        let seq = match take("seq")? {
            Value::Number(n) => n.as_u64().ok_or(ParseError::BadField {
                field: "seq",
                expected: "a non-negative integer",
            })?,
            _ => {
                return Err(ParseError::BadField {
                    field: "seq",
                    expected: "a non-negative integer",
                })
            }
        };
        let string = |name: &'static str, v: Value| match v {
            Value::String(s) => Ok(s),
            _ => Err(ParseError::BadField {
                field: name,
                expected: "a string",
            }),
        };
        let ts = string("ts", take("ts")?)?;
        let kind = string("kind", take("kind")?)?;
        let service = match take("service")? {
            Value::Null => None,
            Value::String(s) => Some(s),
            _ => {
                return Err(ParseError::BadField {
                    field: "service",
                    expected: "null or a string",
                })
            }
        };
        let detail = match take("detail")? {
            Value::Object(m) => m,
            _ => {
                return Err(ParseError::BadField {
                    field: "detail",
                    expected: "an object",
                })
            }
        };
        let prev = string("prev", take("prev")?)?;
        let hash = string("hash", take("hash")?)?;
        // Extra keys are not covered by the hash; accepting them would let
        // anyone smuggle content into a "verified" log.
        if let Some(extra) = obj.keys().next() {
            return Err(ParseError::UnexpectedField(extra.clone()));
        }
        Ok(Entry {
            seq,
            ts,
            kind,
            service,
            detail,
            prev,
            hash,
        })
    }
}

/// Human one-line form: `#seq ts kind service detail` (service `-` if none,
/// detail as compact canonical JSON).
impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let detail = String::from_utf8_lossy(&canonical_detail(&self.detail)).into_owned();
        write!(
            f,
            "#{} {} {} {} {}",
            self.seq,
            self.ts,
            self.kind,
            self.service.as_deref().unwrap_or("-"),
            detail
        )
    }
}

/// Why a line is not an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Not JSON, or not a JSON object (serde's message).
    BadJson(String),
    MissingField(&'static str),
    BadField {
        field: &'static str,
        expected: &'static str,
    },
    UnexpectedField(String),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::BadJson(m) => write!(f, "bad JSON: {m}"),
            ParseError::MissingField(n) => write!(f, "missing field `{n}`"),
            ParseError::BadField { field, expected } => {
                write!(f, "field `{field}` must be {expected}")
            }
            ParseError::UnexpectedField(n) => write!(f, "unexpected field `{n}`"),
        }
    }
}

impl std::error::Error for ParseError {}

/// Kinds are machine-matched by the daemon and by people grepping the log, so
/// they are restricted to `[a-z0-9._-]`, non-empty, at most 256 bytes.
pub fn validate_kind(kind: &str) -> anyhow::Result<()> {
    if kind.is_empty() {
        anyhow::bail!("audit kind must not be empty");
    }
    if kind.len() > MAX_NAME_BYTES {
        anyhow::bail!(
            "audit kind is {} bytes, at most {MAX_NAME_BYTES} allowed",
            kind.len()
        );
    }
    if let Some(c) = kind
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '-'))
    {
        anyhow::bail!("audit kind {kind:?} contains {c:?}; only [a-z0-9._-] are allowed");
    }
    Ok(())
}

/// Service names are free-form but must be non-empty (use `None` for "no
/// service") and short.
fn validate_service(service: &str) -> anyhow::Result<()> {
    if service.is_empty() {
        anyhow::bail!("audit service name must not be empty (pass None for no service)");
    }
    if service.len() > MAX_NAME_BYTES {
        anyhow::bail!(
            "audit service name is {} bytes, at most {MAX_NAME_BYTES} allowed",
            service.len()
        );
    }
    Ok(())
}

fn hash_field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Compact JSON of `detail` with object keys sorted (by bytes) at every depth.
/// This, not the line's textual form, is what the hash covers: a log that was
/// re-serialized with another key order still verifies, and the result does
/// not depend on whether serde_json's `preserve_order` feature is enabled
/// somewhere in the build.
pub fn canonical_detail(detail: &Detail) -> Vec<u8> {
    serde_json::to_vec(&CanonicalMap(detail)).unwrap_or_default()
}

fn serialize_canonical_map<S: Serializer>(m: &Detail, s: S) -> Result<S::Ok, S::Error> {
    CanonicalMap(m).serialize(s)
}

struct CanonicalMap<'a>(&'a Detail);
struct Canonical<'a>(&'a Value);

impl Serialize for CanonicalMap<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut entries: Vec<(&String, &Value)> = self.0.iter().collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut map = s.serialize_map(Some(entries.len()))?;
        for (k, v) in entries {
            map.serialize_entry(k, &Canonical(v))?;
        }
        map.end()
    }
}

impl Serialize for Canonical<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Object(m) => CanonicalMap(m).serialize(s),
            Value::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(&Canonical(v))?;
                }
                seq.end()
            }
            other => other.serialize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Detail {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn line_has_fixed_key_order_and_round_trips() {
        let e = Entry::chained(
            &Head::genesis(),
            "2026-01-01T00:00:00.000Z".into(),
            "svc.restart",
            Some("bot"),
            obj(json!({"z": 1, "a": {"y": [ {"d": 1, "c": 2} ], "b": "x"}})),
        )
        .unwrap();
        let line = e.to_line();
        assert!(line.starts_with(r#"{"seq":1,"ts":"2026-01-01T00:00:00.000Z","kind":"svc.restart","service":"bot","detail":{"a":{"b":"x","y":[{"c":2,"d":1}]},"z":1},"prev":"0000"#), "{line}");
        assert!(line.ends_with(&format!(r#""hash":"{}"}}"#, e.hash)));
        assert_eq!(Entry::parse_line(line.as_bytes()).unwrap(), e);
        assert_eq!(e.compute_hash(), e.hash);
        assert_eq!(e.hash.len(), 64);
    }

    /// Known-answer test: the encoding is a stable contract (old logs must
    /// keep verifying). Expected values were computed independently (Python
    /// hashlib + struct) from the documented encoding.
    #[test]
    fn hash_encoding_known_answers() {
        let e = Entry::chained(
            &Head::genesis(),
            "2026-01-01T00:00:00.000Z".into(),
            "svc.restart",
            Some("bot"),
            obj(json!({"z": 1, "a": {"y": [ {"d": 1, "c": 2} ], "b": "x"}})),
        )
        .unwrap();
        assert_eq!(
            e.hash,
            "6fe720b05ab110f3514605d1fc4f2861630103d3d927d26e57db1c980a1ea814"
        );
        let prev = Head {
            seq: 1,
            hash: GENESIS_HASH.to_owned(),
        };
        let e = Entry::chained(
            &prev,
            "2026-01-01T00:00:00.000Z".into(),
            "k",
            None,
            Detail::new(),
        )
        .unwrap();
        assert_eq!(
            e.hash,
            "11d9d2ad38923986509db9e6490aba5883b5dde8607c4418b850fcb1873e8e01"
        );
    }

    #[test]
    fn hash_is_key_order_independent_but_field_sensitive() {
        let a = obj(json!({"a": 1, "b": {"c": 2, "d": 3}}));
        let mut b = Detail::new();
        let mut inner = Detail::new();
        inner.insert("d".into(), json!(3));
        inner.insert("c".into(), json!(2));
        b.insert("b".into(), Value::Object(inner));
        b.insert("a".into(), json!(1));
        assert_eq!(canonical_detail(&a), canonical_detail(&b));
        let mk = |kind: &str, svc: Option<&str>| {
            Entry::chained(&Head::genesis(), "t".into(), kind, svc, Detail::new())
                .unwrap()
                .hash
        };
        assert_ne!(mk("a", Some("bc")), mk("ab", Some("c")));
        assert_ne!(mk("a", None), mk("a", Some("x")));
    }

    #[test]
    fn kind_validation() {
        assert!(validate_kind("audit.torn_tail").is_ok());
        assert!(validate_kind("memory-violation.v2").is_ok());
        for bad in ["", "Restart", "a b", "x/y", "é"] {
            assert!(validate_kind(bad).is_err(), "{bad:?}");
        }
        let err = validate_kind("Bad").unwrap_err().to_string();
        assert!(err.contains("[a-z0-9._-]"), "{err}");
    }

    #[test]
    fn head_parse_and_display() {
        let h: Head = format!("17:{}", "AB".repeat(32)).parse().unwrap();
        assert_eq!(h.seq, 17);
        assert_eq!(h.hash, "ab".repeat(32));
        assert_eq!(h.to_string().parse::<Head>().unwrap(), h);
        assert_eq!(format!(" {h}\n").parse::<Head>().unwrap(), h);
        let e = "17".parse::<Head>().unwrap_err().to_string();
        assert!(e.contains("SEQ:HASH"), "{e}");
        let e = format!("x:{}", "0".repeat(64))
            .parse::<Head>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("seq \"x\""), "{e}");
        let e = "3:abc".parse::<Head>().unwrap_err().to_string();
        assert!(e.contains("64 hex digits, got 3"), "{e}");
        let e = format!("3:{}", "g".repeat(64))
            .parse::<Head>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("not all hex"), "{e}");
    }

    #[test]
    fn parse_errors_are_specific() {
        assert!(matches!(
            Entry::parse_line(b"{\"seq\":1,"),
            Err(ParseError::BadJson(_))
        ));
        assert!(matches!(
            Entry::parse_line(b"[1]"),
            Err(ParseError::BadJson(_))
        ));
        assert_eq!(
            Entry::parse_line(br#"{"seq":1}"#),
            Err(ParseError::MissingField("ts"))
        );
        let good = Entry::chained(&Head::genesis(), "t".into(), "k", None, Detail::new())
            .unwrap()
            .to_line();
        let extra = good.replacen("{", "{\"x\":1,", 1);
        assert_eq!(
            Entry::parse_line(extra.as_bytes()),
            Err(ParseError::UnexpectedField("x".into()))
        );
        let bad_detail = good.replace("\"detail\":{}", "\"detail\":[]");
        assert!(matches!(
            Entry::parse_line(bad_detail.as_bytes()),
            Err(ParseError::BadField {
                field: "detail",
                ..
            })
        ));
    }
}
