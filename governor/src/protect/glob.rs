//! Shell-style globs over absolute paths: `*`, `?` and `[...]` within one
//! path component (no `**`). Enough for `/etc/bots/*/config.json`.

use std::path::{Path, PathBuf};

/// Whether `s` has glob metacharacters.
pub fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Whether `name` (one path component) matches `pat`.
pub fn matches(pat: &str, name: &str) -> bool {
    let p: Vec<char> = pat.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Leading dots must be matched explicitly, as in the shell.
    if n.first() == Some(&'.') && p.first() != Some(&'.') {
        return false;
    }
    match_from(&p, &n)
}

fn match_from(p: &[char], n: &[char]) -> bool {
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ni));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                '[' => {
                    if let Some((ok, len)) = class(&p[pi..], n[ni]) {
                        if ok {
                            pi += len;
                            ni += 1;
                            continue;
                        }
                    } else if n[ni] == '[' {
                        pi += 1;
                        ni += 1;
                        continue;
                    }
                }
                c if c == n[ni] => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, sn)) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Matches `c` against the class at the start of `p` (`[abc]`, `[a-z]`,
/// `[!x]`); returns (matched, length of the class) or None if unterminated.
fn class(p: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(1), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut ok = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((ok != negate, i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if p[i] <= c && c <= p[i + 2] {
                ok = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                ok = true;
            }
            i += 1;
        }
    }
    None
}

/// Expands an absolute glob to the existing paths it matches, sorted.
pub fn expand(pattern: &str) -> Vec<PathBuf> {
    let mut current = vec![PathBuf::from("/")];
    let comps: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty()).collect();
    for comp in comps {
        let mut next = Vec::new();
        for base in &current {
            if is_glob(comp) {
                let Ok(rd) = std::fs::read_dir(base) else {
                    continue;
                };
                let mut names: Vec<String> = rd
                    .flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .filter(|n| matches(comp, n))
                    .collect();
                names.sort();
                next.extend(names.into_iter().map(|n| base.join(n)));
            } else {
                let p = base.join(comp);
                if p.symlink_metadata().is_ok() {
                    next.push(p);
                }
            }
        }
        current = next;
        if current.is_empty() {
            break;
        }
    }
    current.retain(|p| p != Path::new("/"));
    current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn component_matching() {
        assert!(matches("*.py", "bot.py"));
        assert!(!matches("*.py", "bot.pyc"));
        assert!(matches("b?t.*", "bot.json"));
        assert!(matches("[ab]*", "alpha"));
        assert!(!matches("[!ab]*", "alpha"));
        assert!(matches("[a-c]x", "bx"));
        assert!(!matches("*", ".hidden"));
        assert!(matches(".*", ".hidden"));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(!matches("a*b*c", "aXXbYY"));
    }

    #[test]
    fn expands_in_a_tree() {
        let d = tempfile::tempdir().unwrap();
        for f in ["a/x.json", "a/y.json", "a/z.txt", "b/x.json"] {
            let p = d.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, "").unwrap();
        }
        let pat = format!("{}/*/x.json", d.path().display());
        assert_eq!(expand(&pat).len(), 2);
        let pat = format!("{}/a/*.json", d.path().display());
        assert_eq!(expand(&pat).len(), 2);
        let pat = format!("{}/a/*.nope", d.path().display());
        assert!(expand(&pat).is_empty());
    }
}
