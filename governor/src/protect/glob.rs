//! Shell-style globs over absolute paths: `*`, `?` and `[...]` within one
//! path component (no `**`). Enough for `/etc/bots/*/config.json`.
//!
//! Matching is globset's; what is ours is the walk (one directory listing
//! per glob component) and the shell's rule that a leading dot is matched
//! only explicitly, which globset has no option for.

use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobMatcher};

/// Whether `s` has glob metacharacters.
pub fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// One compiled path component of a pattern.
struct Component {
    matcher: GlobMatcher,
    /// The pattern starts with `.`: only then may it match a hidden name.
    dot: bool,
}

impl Component {
    /// Compiles one component. `*` never crosses `/`; a backslash is an
    /// ordinary character (as in a path); `{`/`}` are literal, as they are
    /// in the paths [`is_glob`] leaves unexpanded (globset would read them
    /// as alternation).
    fn new(comp: &str) -> Result<Self, globset::Error> {
        let pat = comp.replace('{', "[{]").replace('}', "[}]");
        let glob = GlobBuilder::new(&pat)
            .literal_separator(true)
            .backslash_escape(false)
            .build()?;
        Ok(Component {
            matcher: glob.compile_matcher(),
            dot: comp.starts_with('.'),
        })
    }

    fn matches(&self, name: &str) -> bool {
        (self.dot || !name.starts_with('.')) && self.matcher.is_match(name)
    }
}

/// Expands an absolute glob to the existing paths it matches, sorted; an
/// error names the pattern when it doesn't compile.
pub fn expand(pattern: &str) -> Result<Vec<PathBuf>, String> {
    let comps = pattern
        .split('/')
        .filter(|c| !c.is_empty())
        .map(|c| {
            if is_glob(c) {
                Component::new(c)
                    .map(|m| (c, Some(m)))
                    .map_err(|e| format!("bad glob \"{pattern}\": {} in \"{c}\"", e.kind()))
            } else {
                Ok((c, None))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut current = vec![PathBuf::from("/")];
    for (comp, glob) in &comps {
        let mut next = Vec::new();
        for base in &current {
            if let Some(glob) = glob {
                let Ok(rd) = std::fs::read_dir(base) else {
                    continue;
                };
                let mut names: Vec<String> = rd
                    .flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .filter(|n| glob.matches(n))
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
    Ok(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pat: &str, name: &str) -> bool {
        Component::new(pat).unwrap().matches(name)
    }

    #[test]
    fn component_matching() {
        assert!(m("*.py", "bot.py"));
        assert!(!m("*.py", "bot.pyc"));
        assert!(m("b?t.*", "bot.json"));
        assert!(!m("b?t", "bt"));
        assert!(m("[ab]*", "alpha"));
        assert!(!m("[!ab]*", "alpha"));
        assert!(!m("[^ab]*", "alpha"));
        assert!(m("[!ab]*", "gamma"));
        assert!(m("[a-c]x", "bx"));
        assert!(!m("[a-c]x", "dx"));
        assert!(m("a*b*c", "aXXbYYc"));
        assert!(!m("a*b*c", "aXXbYY"));
        // Braces and backslashes are ordinary characters.
        assert!(m("{a,b}*", "{a,b}.json"));
        assert!(!m("{a,b}*", "a.json"));
        assert!(m("a\\*", "a\\x"));
    }

    #[test]
    fn leading_dot_only_explicitly() {
        assert!(!m("*", ".hidden"));
        assert!(!m("?hidden", ".hidden"));
        assert!(!m("[.]hidden", ".hidden"));
        assert!(m(".*", ".hidden"));
        assert!(m("*", "not.hidden"));
    }

    #[test]
    fn bad_pattern_names_itself() {
        let e = expand("/etc/bots/[x/config.json").unwrap_err();
        assert!(e.contains("\"/etc/bots/[x/config.json\""), "{e}");
        assert!(e.contains("\"[x\""), "{e}");
    }

    #[test]
    fn expands_in_a_tree() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "a/x.json",
            "a/y.json",
            "a/z.txt",
            "a/.h.json",
            "b/x.json",
            ".c/x.json",
            "d/e/x.json",
        ] {
            let p = d.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, "").unwrap();
        }
        let root = d.path().display();
        let names = |pat: String| -> Vec<String> {
            expand(&pat)
                .unwrap()
                .iter()
                .map(|p| p.strip_prefix(d.path()).unwrap().display().to_string())
                .collect()
        };
        // `*` stays inside its component: neither .c/ nor d/e/ is reached.
        assert_eq!(names(format!("{root}/*/x.json")), ["a/x.json", "b/x.json"]);
        assert_eq!(names(format!("{root}/a/*.json")), ["a/x.json", "a/y.json"]);
        assert_eq!(names(format!("{root}/a/.*.json")), ["a/.h.json"]);
        assert_eq!(names(format!("{root}/*/*/x.json")), ["d/e/x.json"]);
        assert_eq!(names(format!("{root}/[ab]/?.txt")), ["a/z.txt"]);
        assert!(names(format!("{root}/a/*.nope")).is_empty());
    }
}
