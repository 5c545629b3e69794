//! Real captures for the parsers' tests (`testdata/*.jsonl`): the client side of every
//! connection of one kind while a test app ran, recorded with `observer trace --json`
//! and reduced to (connection, direction, timestamps, true length, captured bytes) and
//! closes.

use base64::Engine as _;

use std::collections::BTreeMap;

use super::{CacheEvent, CacheParseError, Outcome};
use crate::events::Direction;

/// One data record of a connection, or its close (`step` is `None`).
pub struct Rec {
    pub conn: u32,
    pub step: Option<Step>,
}

pub struct Step {
    pub dir: Direction,
    pub enter_ns: u64,
    pub exit_ns: u64,
    pub total_len: u64,
    pub data: Vec<u8>,
}

impl Step {
    /// As a chunk with at most `cap` bytes captured.
    pub fn chunk(&self, cap: usize) -> super::Chunk<'_> {
        super::Chunk {
            dir: self.dir,
            enter_ns: self.enter_ns,
            exit_ns: self.exit_ns,
            bytes: &self.data[..self.data.len().min(cap)],
            total_len: self.total_len,
        }
    }
}

pub fn load(name: &str) -> Vec<Rec> {
    let path = format!("{}/src/protocol/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let conn = v["conn"].as_u64().unwrap() as u32;
            if v.get("close").is_some() {
                return Rec { conn, step: None };
            }
            let dir = if v["dir"] == "send" { Direction::Send } else { Direction::Recv };
            let data = base64::engine::general_purpose::STANDARD.decode(v["data"].as_str().unwrap()).unwrap();
            let n = |k: &str| v[k].as_u64().unwrap();
            Rec {
                conn,
                step: Some(Step {
                    dir,
                    enter_ns: n("enter_ns"),
                    exit_ns: n("exit_ns"),
                    total_len: n("total_len"),
                    data,
                }),
            }
        })
        .collect()
}

/// The lookups of a cache parser's events: (key, outcome).
pub fn gets(ev: &[CacheEvent]) -> Vec<(String, Outcome)> {
    ev.iter()
        .filter_map(|e| match e {
            CacheEvent::Get(g) => Some((String::from_utf8_lossy(&g.key).into_owned(), g.outcome)),
            CacheEvent::Error(_) => None,
        })
        .collect()
}

/// The errors of a cache parser's events.
pub fn errors(ev: &[CacheEvent]) -> Vec<CacheParseError> {
    ev.iter()
        .filter_map(|e| match e {
            CacheEvent::Error(x) => Some(*x),
            CacheEvent::Get(_) => None,
        })
        .collect()
}

/// Lookups by outcome.
pub fn tally(ev: &[CacheEvent]) -> BTreeMap<&'static str, usize> {
    let mut t = BTreeMap::new();
    for (_, o) in gets(ev) {
        let k = match o {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Fail => "fail",
            Outcome::Unknown => "unknown",
        };
        *t.entry(k).or_default() += 1;
    }
    t
}

/// Splits each step's bytes at the given cut points (cycled; each piece at least one
/// byte), both directions: the same stream delivered in other syscalls.
pub fn resplit(steps: &[(Direction, Vec<u8>)], cuts: &[usize]) -> Vec<(Direction, Vec<u8>)> {
    let mut out = Vec::new();
    let mut cuts = cuts.iter().copied().cycle();
    for (dir, b) in steps {
        let mut rest = &b[..];
        while !rest.is_empty() {
            let n = cuts.next().unwrap_or(rest.len()).clamp(1, rest.len());
            out.push((*dir, rest[..n].to_vec()));
            rest = &rest[n..];
        }
    }
    out
}
