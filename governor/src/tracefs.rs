//! Tracepoint record layouts, read from tracefs at load time.
//!
//! Tracepoint formats are a stable ABI per kernel, but they do change between
//! kernels (6.1's `sched_process_fork` carries inline `char[16]` comms where
//! 6.18 uses `__data_loc` strings), so field offsets are looked up, never
//! assumed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Where tracefs is mounted, if it is.
pub fn tracefs_root() -> Option<PathBuf> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
}

/// One field of a tracepoint record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub decl: String,
    pub offset: u32,
    pub size: u32,
}

/// Parses a tracepoint `format` file into its fields.
pub fn parse_format(text: &str) -> Vec<Field> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line.strip_prefix("field:")?;
            let mut decl = None;
            let mut offset = None;
            let mut size = None;
            for part in rest.split(';') {
                let part = part.trim();
                if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.trim().parse().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.trim().parse().ok();
                } else if decl.is_none() && !part.is_empty() && !part.starts_with("signed:") {
                    decl = Some(part.to_string());
                }
            }
            Some(Field {
                decl: decl?,
                offset: offset?,
                size: size?,
            })
        })
        .collect()
}

impl Field {
    /// The field's name: the last identifier of its declaration.
    /// Handles `char comm[16]` and `__data_loc char[] filename` alike.
    pub fn name(&self) -> String {
        let mut plain = String::new();
        let mut depth = 0;
        for c in self.decl.chars() {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ if depth == 0 => plain.push(c),
                _ => {}
            }
        }
        plain
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .find(|s| !s.is_empty())
            .unwrap_or_default()
            .to_string()
    }
}

/// Offset of `field` in the record of tracepoint `category/name`.
pub fn field_offset(root: &Path, category: &str, name: &str, field: &str) -> Result<u32> {
    let path = root.join("events").join(category).join(name).join("format");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading tracepoint format {}", path.display()))?;
    parse_format(&text)
        .into_iter()
        .find(|f| f.name() == field)
        .map(|f| f.offset)
        .with_context(|| format!("tracepoint {category}/{name} has no field `{field}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXEC_6_18: &str = "name: sched_process_exec\nID: 365\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;\n\
\tfield:pid_t pid;\toffset:12;\tsize:4;\tsigned:1;\n";

    const FORK_6_1: &str = "format:\n\
\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;\n";

    #[test]
    fn parses_fields_and_names() {
        let f = parse_format(EXEC_6_18);
        assert_eq!(f.len(), 4);
        assert_eq!(f[2].name(), "filename");
        assert_eq!(f[2].offset, 8);
        assert_eq!(f[3].name(), "pid");
        let f = parse_format(FORK_6_1);
        assert_eq!(f[0].name(), "parent_comm");
        assert_eq!(f[1].offset, 24);
    }
}
